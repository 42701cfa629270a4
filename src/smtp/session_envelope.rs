//! The envelope part of the session: MAIL, RCPT and DATA, with the
//! checks each makes (order, relaying, limits, TLS and size).

use std::borrow::Cow;

use super::*;

impl Session {
    pub(super) fn mail(
        &mut self,
        from: smtp_proto::MailFrom<Cow<'_, str>>,
        raw_path: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) {
        if self.helo.is_none() {
            return self.error("503 5.5.1 Error: send HELO/EHLO first", out);
        }
        if self.tx.is_some() {
            return self.error("503 5.5.1 Error: nested MAIL command", out);
        }
        let tls_required = self.cfg.tls.as_ref().is_some_and(|t| t.require_tls);
        if tls_required && self.may_relay && !self.tls {
            return match self.offer_tls {
                true => self.error("530 5.7.0 Must issue a STARTTLS command first", out),
                // Required but not on offer (the certificate did not load):
                // a temporary failure, so the client waits and retries.
                false => self.error("454 4.7.0 TLS not available due to temporary reason", out),
            };
        }
        let sender = match raw_path.map(address::parse) {
            Some(Ok(None)) => String::new(),
            Some(Ok(Some(path))) => path.mailbox(),
            _ => return self.error("501 5.1.7 Bad sender address syntax", out),
        };
        let unoffered = from.flags & !MAIL_FLAGS_OFFERED != 0
            || from.trans_id.is_some()
            || from.env_id.is_some()
            || from.solicit.is_some()
            || from.mtrk.is_some()
            || from.auth.is_some()
            || from.hold_for != 0
            || from.hold_until != 0
            || from.by != 0
            || from.mt_priority != 0;
        if unoffered {
            return self.error("555 5.5.4 Unsupported MAIL parameter", out);
        }
        if from.size as u64 > self.max_size {
            return self.error("552 5.3.4 Message size exceeds fixed maximum", out);
        }
        // RFC 1870: a size that does not fit now is a temporary refusal.
        // Without SIZE, there must be room for the first step at least.
        let size = (from.size as u64)
            .max(DataReceiver::FIRST_STEP)
            .min(self.max_size);
        let room = |m: &Arc<BodyMemory>| m.has_room(size, self.cfg.receive_memory);
        if self.memory.as_ref().is_some_and(|m| !room(m)) {
            return self.reply(NO_STORAGE, out);
        }
        if self.budget.as_ref().is_some_and(|b| !b.message()) {
            let r = "451 4.7.1 Too many messages from your address, try again later";
            return self.reply(r, out);
        }
        self.tx = Some(Transaction {
            sender,
            recipients: Vec::new(),
            rcpt_tried: false,
        });
        self.idle_commands = 0;
        self.reply("250 2.1.0 Ok", out);
    }

    pub(super) fn rcpt(
        &mut self,
        to: smtp_proto::RcptTo<Cow<'_, str>>,
        raw_path: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) {
        let Some(tx) = self.tx.as_mut() else {
            return self.error("503 5.5.1 Error: need MAIL command", out);
        };
        tx.rcpt_tried = true;
        if to.orcpt.is_some() || to.flags != 0 || to.rrvs != 0 {
            return self.error("555 5.5.4 Unsupported RCPT parameter", out);
        }
        let raw = raw_path.unwrap_or_default();
        let rcpt = if raw.eq_ignore_ascii_case(b"postmaster") {
            // RFC 5321 §4.5.1: must be accepted without a domain.
            format!("postmaster@{}", self.cfg.hostname.to_ascii_lowercase())
        } else {
            match address::parse(raw) {
                Ok(Some(path)) => {
                    let denied = !self.may_relay
                        && (path.routed
                            || path.has_relay_syntax()
                            || !address::domain_in(&path.domain, &self.cfg.accept_domains));
                    if denied {
                        return self.error("554 5.7.1 Relay access denied", out);
                    }
                    path.mailbox()
                }
                Ok(None) | Err(PathError::Syntax) => {
                    return self.error("501 5.1.3 Bad recipient address syntax", out)
                }
                Err(PathError::NoDomain) => {
                    return self.error("501 5.1.3 Recipient address must contain a domain", out)
                }
            }
        };
        // Re-borrow: `self.error` above needed all of `self`.
        let (max, tx) = (self.cfg.max_recipients, self.tx.as_mut());
        let Some(tx) = tx else { return };
        if !tx.recipients.contains(&rcpt) {
            if tx.recipients.len() >= max {
                // A client sending a long list is not misbehaving; no penalty.
                out.push(Output::Reply("452 4.5.3 Too many recipients\r\n".into()));
                return;
            }
            if self.budget.as_ref().is_some_and(|b| !b.recipient()) {
                let r = "451 4.7.1 Too many recipients from your address, try again later\r\n";
                out.push(Output::Reply(r.into()));
                return;
            }
            tx.recipients.push(rcpt);
        }
        self.reply("250 2.1.5 Ok", out);
    }

    pub(super) fn data(&mut self, out: &mut Vec<Output>) {
        match &self.tx {
            None => self.error("503 5.5.1 Error: need MAIL command", out),
            Some(tx) if tx.recipients.is_empty() && !tx.rcpt_tried => {
                self.error("503 5.5.1 Error: need RCPT command", out)
            }
            Some(tx) if tx.recipients.is_empty() => {
                self.error("554 5.5.1 Error: no valid recipients", out)
            }
            Some(_) => {
                let mut receiver = DataReceiver::new(self.max_size);
                if let Some(m) = &self.memory {
                    let limit = self.cfg.receive_memory;
                    let mut charge = Charge::new(m.clone(), limit);
                    if let Some(b) = &self.budget {
                        let share = client_share(limit, self.cfg.max_message_size);
                        charge = charge.for_client(b.clone(), share);
                    }
                    receiver = receiver.counted(charge);
                }
                self.mode = Mode::Data(receiver);
                self.reply("354 End data with <CR><LF>.<CR><LF>", out);
            }
        }
    }
}
