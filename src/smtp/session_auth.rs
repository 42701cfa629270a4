//! AUTH PLAIN and LOGIN (RFC 4954) for the session: the command, the
//! lines answering its challenges, and the verdict on the credentials
//! (checked outside the machine).

use super::{trim_eol, Mode, Output, Session, Verdict};

/// Base64 to UTF-8 text, if it is both.
fn decode(b64: &[u8]) -> Option<String> {
    use base64ct::{Base64, Encoding};
    let bytes = Base64::decode_vec(std::str::from_utf8(b64).ok()?).ok()?;
    String::from_utf8(bytes).ok()
}

impl Session {
    /// The outcome of the last `Verify` for `user`; then input pipelined
    /// behind it goes on.
    pub fn verified(&mut self, user: &str, verdict: Verdict, out: &mut Vec<Output>) {
        if !self.is_verifying() {
            return;
        }
        self.mode = Mode::Command;
        match verdict {
            Verdict::Valid => {
                if let Some(b) = &self.budget {
                    b.auth_succeeded();
                }
                // An authenticated client may relay, as one in relay_networks.
                self.user = Some(user.to_string());
                self.may_relay = true;
                self.reply("235 2.7.0 Authentication successful", out);
            }
            Verdict::Invalid => self.error("535 5.7.8 Authentication credentials invalid", out),
            Verdict::Busy => self.reply("454 4.7.0 Temporary authentication failure", out),
        }
        self.process_buffered(out);
    }

    /// AUTH PLAIN and LOGIN (RFC 4954), only over TLS.
    pub(super) fn auth(&mut self, line: &[u8], out: &mut Vec<Output>) {
        if !self.offer_auth {
            return self.error("502 5.5.1 Command not implemented", out);
        }
        if !self.tls {
            return self.error(
                "538 5.7.11 Encryption required for requested authentication mechanism",
                out,
            );
        }
        if self.helo.is_none() {
            return self.error("503 5.5.1 Error: send EHLO first", out);
        }
        if self.user.is_some() || self.tx.is_some() {
            return self.error(
                "503 5.5.1 Error: already authenticated or in a transaction",
                out,
            );
        }
        if self.budget.as_ref().is_some_and(|b| !b.auth_attempt()) {
            let r = "454 4.7.0 Too many authentication failures from your address, try again later";
            return self.reply(r, out);
        }
        let text = String::from_utf8_lossy(line);
        let mut words = text.split_ascii_whitespace().skip(1);
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next();
        match (mechanism.as_str(), initial) {
            ("PLAIN", Some(resp)) => self.auth_plain(resp.as_bytes(), out),
            ("PLAIN", None) => {
                self.mode = Mode::AuthPlain;
                out.push(Output::Reply("334 \r\n".into()));
            }
            ("LOGIN", Some(resp)) => self.auth_user(resp.as_bytes(), out),
            ("LOGIN", None) => {
                self.mode = Mode::AuthUser;
                out.push(Output::Reply("334 VXNlcm5hbWU6\r\n".into()));
            }
            _ => self.error("504 5.5.4 Unrecognized authentication type", out),
        }
    }

    /// A line answering a 334 challenge.
    pub(super) fn auth_line(&mut self, line: &[u8], out: &mut Vec<Output>) {
        let line = trim_eol(line);
        let mode = std::mem::replace(&mut self.mode, Mode::Command);
        if line == b"*" {
            return self.error("501 5.0.0 Authentication cancelled", out);
        }
        match mode {
            Mode::AuthPlain => self.auth_plain(line, out),
            Mode::AuthUser => self.auth_user(line, out),
            Mode::AuthPassword(user) => match decode(line) {
                Some(password) => self.verify(user, password, out),
                None => self.error("501 5.5.2 Cannot decode response", out),
            },
            _ => {}
        }
    }

    pub(super) fn auth_plain(&mut self, b64: &[u8], out: &mut Vec<Output>) {
        let Some(text) = decode(b64) else {
            return self.error("501 5.5.2 Cannot decode response", out);
        };
        // authzid NUL authcid NUL password; acting as another is refused.
        let parts: Vec<&str> = text.split('\0').collect();
        match parts[..] {
            [authz, user, password] if authz.is_empty() || authz == user => {
                let (user, password) = (user.to_string(), password.to_string());
                self.verify(user, password, out)
            }
            _ => self.error("501 5.5.2 Cannot decode response", out),
        }
    }

    pub(super) fn auth_user(&mut self, b64: &[u8], out: &mut Vec<Output>) {
        match decode(b64) {
            Some(user) => {
                self.mode = Mode::AuthPassword(user);
                out.push(Output::Reply("334 UGFzc3dvcmQ6\r\n".into()));
            }
            None => self.error("501 5.5.2 Cannot decode response", out),
        }
    }

    pub(super) fn verify(&mut self, user: String, password: String, out: &mut Vec<Output>) {
        self.mode = Mode::Verifying;
        out.push(Output::Verify { user, password });
    }
}
