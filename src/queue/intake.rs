//! Intake: turns an SMTP transaction into a durable, queued message. The
//! SMTP side hands it what a client sent; it adds the Received header,
//! stores the message in the spool and admits it to the queue, so "250"
//! is only said for mail that is on disk and will be delivered.

use std::sync::Arc;

use bytes::BytesMut;

use super::QueueHandle;
use crate::events;
use crate::smtp::{Accept, Incoming};
use crate::spool::{Envelope, IdGen, QueueId, RcptState, Recipient, Spool, SpoolFuture};

/// Turns an SMTP transaction into a durable, queued message.
pub struct Intake {
    spool: Arc<dyn Spool>,
    queue: QueueHandle,
    ids: Arc<IdGen>,
    hostname: String,
}

impl Intake {
    /// Store into `spool` and admit to `queue`, numbering messages from
    /// `ids`; `hostname` is the name the Received header says took them.
    pub fn new(
        spool: Arc<dyn Spool>,
        queue: QueueHandle,
        ids: Arc<IdGen>,
        hostname: String,
    ) -> Intake {
        Intake {
            spool,
            queue,
            ids,
            hostname,
        }
    }
}

/// The Received header (RFC 5321 section 4.4) for message `id` that
/// `hostname` took from `m` at `date`. It goes above everything the
/// client sent: trace headers are read top down, newest hop first.
fn received_header(hostname: &str, m: &Incoming, id: QueueId, date: &str) -> String {
    // The client's words go into a header: keep only printable ASCII.
    let helo: String = m.helo.chars().filter(|c| c.is_ascii_graphic()).collect();
    let helo = if helo.is_empty() { "unknown" } else { &helo };
    let rcpt = match m.recipients.as_slice() {
        [one] => format!("\r\n\tfor <{one}>"),
        _ => String::new(),
    };
    // RFC 3848: S for TLS, A for an authenticated client.
    let with = match (m.tls, m.user.is_some()) {
        (true, true) => "ESMTPSA",
        (true, false) => "ESMTPS",
        (false, true) => "ESMTPA",
        (false, false) => "ESMTP",
    };
    format!(
        "Received: from {helo} ([{}])\r\n\tby {hostname} (mtad) with {with} id {id}{rcpt};\r\n\t{date}\r\n",
        m.client_ip
    )
}

impl Accept for Intake {
    fn accept(&self, mut m: Incoming) -> SpoolFuture<'_, QueueId> {
        Box::pin(async move {
            let id = self.ids.next();
            let date = jiff::fmt::rfc2822::to_string(&jiff::Zoned::now()).unwrap_or_default();
            let header = received_header(&self.hostname, &m, id, &date);
            let mut body = BytesMut::with_capacity(header.len() + m.body.len());
            body.extend_from_slice(header.as_bytes());
            body.extend_from_slice(&m.body);
            // Not kept through the store: the copy is what goes to disk.
            drop(std::mem::take(&mut m.body));
            let envelope = Envelope {
                id,
                sender: m.sender,
                recipients: m
                    .recipients
                    .into_iter()
                    .map(|address| Recipient {
                        address,
                        state: RcptState::Pending { attempts: 0 },
                    })
                    .collect(),
                arrived_ms: crate::clock::now_ms(),
                holders: Vec::new(),
            };
            self.spool.store(envelope.clone(), body.freeze()).await?;
            let rcpts: Vec<&str> = envelope
                .recipients
                .iter()
                .map(|r| r.address.as_str())
                .collect();
            let reply = format!("250 2.0.0 Ok: queued as {id}");
            let client = m.client_ip.to_string();
            let user = m.user.as_deref().unwrap_or("");
            events::received(
                id,
                &envelope.sender,
                &rcpts.join(","),
                &client,
                user,
                &reply,
            );
            self.queue.admit(envelope);
            Ok(id)
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::sync::mpsc;

    use super::*;
    use crate::spool::memory::MemorySpool;

    fn incoming(recipients: &[&str]) -> Incoming {
        Incoming {
            sender: "s@example.org".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            body: Bytes::from_static(b"Subject: hi\r\n\r\nbody\r\n"),
            client_ip: "192.0.2.7".parse().unwrap(),
            helo: "client.example".into(),
            tls: false,
            user: None,
        }
    }

    /// An intake on a memory spool, and what it admits to the queue.
    fn intake(spool: &MemorySpool) -> (Intake, mpsc::UnboundedReceiver<Envelope>) {
        let (tx, admitted) = mpsc::unbounded_channel();
        let (ops, _) = mpsc::unbounded_channel();
        let queue = QueueHandle { tx, ops };
        let ids = Arc::new(IdGen::new(QueueId(0)));
        let intake = Intake::new(Arc::new(spool.clone()), queue, ids, "mx.example".into());
        (intake, admitted)
    }

    #[test]
    fn the_received_header_names_client_node_protocol_id_and_the_one_recipient() {
        let mut m = incoming(&["r@example.net"]);
        m.tls = true;
        m.user = Some("alice".into());
        let date = "Mon, 1 Jan 2024 00:00:00 +0000";
        assert_eq!(
            received_header("mx.example", &m, QueueId(0x2a), date),
            "Received: from client.example ([192.0.2.7])\r\n\
             \tby mx.example (mtad) with ESMTPSA id 000000000000002A\r\n\
             \tfor <r@example.net>;\r\n\
             \tMon, 1 Jan 2024 00:00:00 +0000\r\n"
        );
    }

    #[test]
    fn the_received_header_says_tls_and_auth_and_keeps_the_clients_words_safe() {
        let date = "d";
        let with = |tls, user: Option<&str>| {
            let mut m = incoming(&["r@example.net"]);
            m.tls = tls;
            m.user = user.map(Into::into);
            received_header("mx", &m, QueueId(1), date)
        };
        assert!(with(false, None).contains(" with ESMTP id "));
        assert!(with(true, None).contains(" with ESMTPS id "));
        assert!(with(false, Some("a")).contains(" with ESMTPA id "));
        assert!(with(true, Some("a")).contains(" with ESMTPSA id "));
        // Two recipients: no "for", which would name only one of them.
        let two = received_header("mx", &incoming(&["a@x", "b@x"]), QueueId(1), date);
        assert!(!two.contains("for <"), "{two}");
        // Spaces and line breaks in HELO cannot add header lines.
        let mut m = incoming(&["r@x"]);
        m.helo = "evil\r\nX-Injected: 1".into();
        let h = received_header("mx", &m, QueueId(1), date);
        assert!(
            h.starts_with("Received: from evilX-Injected:1 ([192.0.2.7])"),
            "{h}"
        );
        m.helo = " \t".into();
        let h = received_header("mx", &m, QueueId(1), date);
        assert!(h.starts_with("Received: from unknown ([192.0.2.7])"), "{h}");
    }

    #[tokio::test]
    async fn a_message_is_stored_with_the_header_first_then_admitted() {
        let spool = MemorySpool::new();
        let (intake, mut admitted) = intake(&spool);
        let id = intake.accept(incoming(&["r@example.net"])).await.unwrap();
        let stored = spool.body(id).await.unwrap();
        let text = std::str::from_utf8(&stored).unwrap();
        let head = format!(
            "Received: from client.example ([192.0.2.7])\r\n\
             \tby mx.example (mtad) with ESMTP id {id}\r\n\
             \tfor <r@example.net>;\r\n\t"
        );
        assert!(text.starts_with(&head), "{text}");
        // The header's last line (the date) ends right before the message.
        let (received, rest) = text.split_once("\r\nSubject: hi").unwrap();
        assert!(!received[head.len()..].contains('\n'), "{text}");
        assert_eq!(rest, "\r\n\r\nbody\r\n");
        let envelope = admitted.try_recv().expect("admitted to the queue");
        assert_eq!(envelope.id, id);
        assert_eq!(envelope.sender, "s@example.org");
        assert_eq!(envelope.recipients.len(), 1);
        assert_eq!(envelope.recipients[0].address, "r@example.net");
        assert_eq!(
            envelope.recipients[0].state,
            RcptState::Pending { attempts: 0 }
        );
        assert_eq!(spool.envelopes(), [envelope]);
    }

    #[tokio::test]
    async fn a_message_the_spool_cannot_keep_is_refused_and_not_queued() {
        let spool = MemorySpool::new();
        spool.fail_fsync(true);
        let (intake, mut admitted) = intake(&spool);
        assert!(intake.accept(incoming(&["r@example.net"])).await.is_err());
        assert!(admitted.try_recv().is_err(), "nothing admitted");
        assert!(spool.envelopes().is_empty());
    }
}
