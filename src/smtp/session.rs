//! The inbound SMTP session as a pure state machine: bytes in, replies and
//! messages out. No sockets, clocks or randomness, so every behaviour is
//! unit-testable and independent of how input is split across reads.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use smtp_proto::{Error as ParseError, Request};

use super::address::{self, PathError};
use super::budget::Budget;
use super::data::{DataOutcome, DataReceiver};
use super::memory::{client_share, BodyMemory, Charge};
use super::Incoming;
use crate::config::SmtpConfig;
use crate::spool::{QueueId, SpoolError};

/// Longest command line, terminator included (RFC 5321 §4.5.3.1.4).
pub const MAX_LINE: usize = 512;
/// Longest line answering an AUTH challenge (RFC 4954 section 4; the AUTH
/// command itself keeps [`MAX_LINE`], so a client with long credentials
/// sends them after the 334 rather than as an initial response).
pub const MAX_AUTH_LINE: usize = 12_288;
/// Consecutive failed commands before the client is disconnected.
pub const MAX_ERRORS: u32 = 10;

/// A line without its CRLF (or LF).
fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The node's memory for message bodies is spent for now (RFC 1870 6.2).
const NO_STORAGE: &str = "452 4.3.1 Insufficient system storage, try again later";

/// Verbs we recognise but do not offer; they get 502 rather than 500.
const NOT_OFFERED: &[&str] = &["EXPN", "BDAT", "ETRN", "ATRN", "BURL", "LHLO", "TURN"];
/// MAIL parameters we advertise (BODY=7BIT is the default and harmless).
const MAIL_FLAGS_OFFERED: u64 = smtp_proto::MAIL_BODY_7BIT | smtp_proto::MAIL_BODY_8BITMIME;

/// What checking credentials found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The password is the user's.
    Valid,
    /// It is not (or no such user).
    Invalid,
    /// Not checked: the server is checking as many as it can.
    Busy,
}

/// Something the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this reply (complete, CRLF-terminated, possibly multiline).
    Reply(String),
    /// Store this message, then call [`Session::stored`] with the result.
    Deliver(Incoming),
    /// Close the connection after sending the replies before it.
    Close,
    /// Send the replies before it, then run the TLS handshake and call
    /// [`Session::tls_started`]; read nothing in plaintext meanwhile.
    StartTls,
    /// Check these credentials (slowly, elsewhere), then call
    /// [`Session::verified`].
    Verify {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
}

#[derive(Debug)]
enum Mode {
    /// Reading command lines.
    Command,
    /// Skipping the rest of an overlong command line.
    Discard,
    /// Reading message content.
    Data(DataReceiver),
    /// A message was handed out; input is buffered until `stored`.
    Storing,
    /// STARTTLS was accepted: nothing more is read until the handshake.
    Handshake,
    /// AUTH PLAIN without an initial response: the next line is it.
    AuthPlain,
    /// AUTH LOGIN: the next line is the user name.
    AuthUser,
    /// AUTH LOGIN: the next line is the password for this user.
    AuthPassword(String),
    /// Credentials are out for checking; input waits until `verified`.
    Verifying,
    /// Nothing more will be read or written.
    Closed,
}

#[derive(Debug)]
struct Transaction {
    sender: String,
    recipients: Vec<String>,
    /// Whether any RCPT was tried, to tell "no RCPT" (503) from "all
    /// recipients refused" (554) at DATA.
    rcpt_tried: bool,
}

/// One client connection's SMTP state.
#[derive(Debug)]
pub struct Session {
    cfg: Arc<SmtpConfig>,
    client_ip: IpAddr,
    may_relay: bool,
    helo: Option<String>,
    tx: Option<Transaction>,
    mode: Mode,
    /// Input not yet processed: a partial command line, or everything that
    /// arrived while a message is being stored.
    buf: Vec<u8>,
    errors: u32,
    /// Commands since the last accepted MAIL (or the start).
    idle_commands: usize,
    /// The connection is encrypted.
    tls: bool,
    /// STARTTLS is offered (configured, and its certificate loaded).
    offer_tls: bool,
    /// The client address's share of messages and recipients per minute
    /// (None: not limited, e.g. a trusted client).
    budget: Option<Arc<dyn Budget>>,
    /// SMTP AUTH is configured (offered once TLS is on).
    offer_auth: bool,
    /// Who authenticated, if anyone.
    user: Option<String>,
    /// The node's memory for message bodies (None: not counted).
    memory: Option<Arc<BodyMemory>>,
    /// What the body being stored holds of it.
    charge: Option<Charge>,
    /// The largest message accepted from this client.
    max_size: u64,
}

/// How far past `max_message_size` a cluster member's message may be: it
/// was accepted within the limit where it entered the cluster, and each
/// node it passed through since added a Received header of its own.
pub const MEMBER_ALLOWANCE: u64 = 64 * 1024;

impl Session {
    /// A session for a client connected from `client_ip`.
    pub fn new(cfg: Arc<SmtpConfig>, client_ip: IpAddr) -> Self {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let client_ip = client_ip.to_canonical();
        let may_relay = cfg.trusts(client_ip);
        let cfg_tls = cfg.tls.is_some();
        let cfg_auth = cfg.auth.is_some();
        let max_size = cfg.max_message_size;
        Self {
            cfg,
            client_ip,
            may_relay,
            helo: None,
            tx: None,
            mode: Mode::Command,
            buf: Vec::new(),
            errors: 0,
            idle_commands: 0,
            tls: false,
            offer_tls: cfg_tls,
            budget: None,
            offer_auth: cfg_auth,
            user: None,
            memory: None,
            charge: None,
            max_size,
        }
    }

    /// The client is another member of this node's cluster, handing on
    /// mail the cluster has accepted already: its size limit is
    /// `max_message_size` plus [`MEMBER_ALLOWANCE`], so such mail never
    /// bounces for the Received headers added on its way.
    pub fn for_cluster_member(&mut self) {
        self.max_size = self.cfg.max_message_size.saturating_add(MEMBER_ALLOWANCE);
    }

    /// Do not offer AUTH after all (the credentials could not be loaded).
    pub fn without_auth(&mut self) {
        self.offer_auth = false;
    }

    /// Count message bodies against the node's `memory`.
    pub fn with_memory(&mut self, memory: Arc<BodyMemory>) {
        self.memory = Some(memory);
    }

    /// Count messages and recipients against `budget`.
    pub fn with_budget(&mut self, budget: Arc<dyn Budget>) {
        self.budget = Some(budget);
    }

    /// The handshake after STARTTLS (or on an implicit-TLS listener)
    /// succeeded: the session starts over, as RFC 3207 §4.2 requires — no
    /// HELO, no transaction, and nothing the client sent in plaintext.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.tx = None;
        self.buf.clear();
        self.mode = Mode::Command;
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Do not offer STARTTLS after all (the certificate could not be
    /// loaded: better plaintext than no mail).
    pub fn without_tls(&mut self) {
        self.offer_tls = false;
    }

    /// The 220 banner to send on connect.
    pub fn greeting(&self) -> String {
        format!("220 {} ESMTP mtad\r\n", self.cfg.hostname)
    }

    /// Whether the session is done; the driver should close.
    pub fn is_closed(&self) -> bool {
        matches!(self.mode, Mode::Closed)
    }

    /// Whether the session is between transactions (no MAIL accepted, no
    /// message in flight): a stopping node turns it away at once.
    pub fn is_idle(&self) -> bool {
        self.tx.is_none()
            && matches!(
                self.mode,
                Mode::Command
                    | Mode::Discard
                    | Mode::AuthPlain
                    | Mode::AuthUser
                    | Mode::AuthPassword(_)
            )
    }

    /// Whether a message is out for storage and `stored` is awaited.
    pub fn is_storing(&self) -> bool {
        matches!(self.mode, Mode::Storing)
    }

    /// Whether credentials are out for checking and `verified` is awaited.
    pub fn is_verifying(&self) -> bool {
        matches!(self.mode, Mode::Verifying)
    }

    /// Who authenticated, if anyone.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Consume client input, appending what to do to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Output>) {
        match self.mode {
            Mode::Closed | Mode::Handshake => return,
            Mode::Storing | Mode::Verifying => {
                self.buf.extend_from_slice(input);
                return;
            }
            _ => {}
        }
        if self.buf.is_empty() {
            // Common case: no copy of the input at all.
            let used = self.process(input, out);
            if !self.is_closed() && !matches!(self.mode, Mode::Handshake) {
                self.buf.extend_from_slice(&input[used..]);
            }
        } else {
            self.buf.extend_from_slice(input);
            self.process_buffered(out);
        }
    }

    /// Report the result of storing the message from the last `Deliver`,
    /// then continue with input that was pipelined behind it.
    pub fn stored(&mut self, result: Result<QueueId, SpoolError>, out: &mut Vec<Output>) {
        if !self.is_storing() {
            return;
        }
        let reply = match result {
            Ok(id) => format!("250 2.0.0 Ok: queued as {id}\r\n"),
            Err(SpoolError::Full) => {
                format!("{NO_STORAGE}\r\n")
            }
            // Another member may be back soon: a transient condition of
            // the mail system (RFC 3463 4.4.0).
            Err(SpoolError::Replicas { .. }) => {
                "451 4.4.0 Not enough copies of the message could be made; try again later\r\n"
                    .to_owned()
            }
            Err(_) => "451 4.3.0 Error: queue file write error\r\n".to_owned(),
        };
        out.push(Output::Reply(reply));
        self.tx = None;
        self.charge = None;
        self.mode = Mode::Command;
        self.process_buffered(out);
    }

    /// The client was silent too long.
    pub fn timeout(&mut self, out: &mut Vec<Output>) {
        let host = &self.cfg.hostname;
        self.close(format!("421 4.4.2 {host} Error: timeout exceeded\r\n"), out);
    }

    /// The server is stopping. Call only when not storing, so that a
    /// message being stored still gets its answer.
    pub fn shutdown(&mut self, out: &mut Vec<Output>) {
        let host = &self.cfg.hostname;
        self.close(format!("421 4.3.2 {host} Service shutting down\r\n"), out);
    }

    fn close(&mut self, reply: String, out: &mut Vec<Output>) {
        if self.is_closed() {
            return;
        }
        out.push(Output::Reply(reply));
        out.push(Output::Close);
        self.mode = Mode::Closed;
        self.buf = Vec::new();
    }

    fn process_buffered(&mut self, out: &mut Vec<Output>) {
        let mut buf = std::mem::take(&mut self.buf);
        let used = self.process(&buf, out);
        if !self.is_closed() && !matches!(self.mode, Mode::Handshake) && used < buf.len() {
            buf.drain(..used);
            self.buf = buf;
        }
    }

    /// Run the machine over `input`; returns how many bytes were consumed.
    /// Stops early when a message goes out for storage or the session ends.
    fn process(&mut self, input: &[u8], out: &mut Vec<Output>) -> usize {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match &mut self.mode {
                Mode::Closed | Mode::Storing | Mode::Handshake | Mode::Verifying => return pos,
                Mode::Data(rx) => {
                    let (used, outcome) = rx.feed(rest);
                    pos += used;
                    match outcome {
                        Some(outcome) => self.data_done(outcome, out),
                        None => return pos,
                    }
                }
                Mode::Discard => match rest.iter().position(|&b| b == b'\n') {
                    Some(lf) => {
                        pos += lf + 1;
                        self.mode = Mode::Command;
                    }
                    None => return input.len(),
                },
                Mode::Command | Mode::AuthPlain | Mode::AuthUser | Mode::AuthPassword(_) => {
                    let command = matches!(self.mode, Mode::Command);
                    let max = if command { MAX_LINE } else { MAX_AUTH_LINE };
                    let window = &rest[..rest.len().min(max)];
                    match window.iter().position(|&b| b == b'\n') {
                        Some(lf) if !command => {
                            pos += lf + 1;
                            self.auth_line(&rest[..=lf], out);
                        }
                        Some(lf) => {
                            pos += lf + 1;
                            let pipelined = pos < input.len();
                            self.command(&rest[..=lf], pipelined, out);
                        }
                        None if rest.len() >= max => {
                            pos += max;
                            self.mode = Mode::Discard;
                            match command {
                                true => self.error("500 5.5.2 Line too long", out),
                                false => self.error(
                                    "500 5.5.6 Authentication Exchange line is too long",
                                    out,
                                ),
                            }
                        }
                        None => return pos,
                    }
                }
            }
        }
    }

    fn data_done(&mut self, outcome: DataOutcome, out: &mut Vec<Output>) {
        let charge = match &mut self.mode {
            Mode::Data(d) => d.take_charge(),
            _ => None,
        };
        self.mode = Mode::Command;
        let Some(tx) = self.tx.take() else {
            // DATA is only entered with a transaction; stay safe regardless.
            return self.reply("451 4.3.0 Error: no transaction", out);
        };
        match outcome {
            DataOutcome::Complete(body) => {
                // Held until the body is stored.
                self.charge = charge;
                self.mode = Mode::Storing;
                out.push(Output::Deliver(Incoming {
                    sender: tx.sender,
                    recipients: tx.recipients,
                    body,
                    client_ip: self.client_ip,
                    helo: self.helo.clone().unwrap_or_default(),
                    tls: self.tls,
                    user: self.user.clone(),
                }));
            }
            DataOutcome::BareLineEnding => {
                self.reply("550 5.6.0 Bare CR or LF in message content", out)
            }
            DataOutcome::TooBig => self.reply("552 5.3.4 Message size exceeds fixed maximum", out),
            DataOutcome::NoMemory => self.reply(NO_STORAGE, out),
        }
    }

    /// Handle one complete command line (terminator included);
    /// `pipelined`: more input followed it.
    fn command(&mut self, line: &[u8], pipelined: bool, out: &mut Vec<Output>) {
        let verb = verb(line);
        let is_tx_verb = ["MAIL", "RCPT", "DATA", "QUIT"]
            .iter()
            .any(|v| verb.eq_ignore_ascii_case(v.as_bytes()));
        if !is_tx_verb {
            self.idle_commands += 1;
            if self.idle_commands > self.cfg.max_commands_before_mail {
                let host = &self.cfg.hostname;
                return self.close(
                    format!("421 4.7.0 {host} Error: too many commands\r\n"),
                    out,
                );
            }
        }
        if verb.eq_ignore_ascii_case(b"STARTTLS") {
            return self.starttls(line, pipelined, out);
        }
        if verb.eq_ignore_ascii_case(b"AUTH") {
            return self.auth(line, out);
        }
        if NOT_OFFERED
            .iter()
            .any(|v| verb.eq_ignore_ascii_case(v.as_bytes()))
        {
            return self.error("502 5.5.1 Command not implemented", out);
        }

        // MAIL and RCPT paths are parsed by us (see `address`); smtp_proto
        // sees `<>` in their place and parses verb and parameters.
        let path = address::locate(line);
        let rewritten;
        let parse_line: &[u8] = match path {
            Some((start, end)) if is_tx_verb => {
                rewritten = [&line[..start], &line[end..]].concat();
                &rewritten
            }
            _ => line,
        };
        let raw_path = path.map(|(start, end)| &line[start..end]);
        match Request::parse(&mut parse_line.iter()) {
            Ok(request) => self.request(request, raw_path, out),
            Err(e) => self.parse_error(e, out),
        }
    }

    fn parse_error(&mut self, e: ParseError, out: &mut Vec<Output>) {
        let reply = match e {
            ParseError::UnknownCommand => "500 5.5.1 Command unrecognized".to_owned(),
            ParseError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax".to_owned(),
            ParseError::InvalidRecipientAddress => {
                "501 5.1.3 Bad recipient address syntax".to_owned()
            }
            ParseError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
            ParseError::InvalidParameter { param } => format!("501 5.5.4 Invalid {param} value"),
            ParseError::UnsupportedParameter { param } => {
                format!("555 5.5.4 Unsupported parameter {}", printable(&param))
            }
            _ => "501 5.5.4 Syntax error".to_owned(),
        };
        self.error(&reply, out);
    }

    fn request(
        &mut self,
        request: Request<Cow<'_, str>>,
        raw_path: Option<&[u8]>,
        out: &mut Vec<Output>,
    ) {
        match request {
            Request::Ehlo { host } => {
                self.helo = Some(host.into_owned());
                self.tx = None;
                let (h, max) = (&self.cfg.hostname, self.max_size);
                let starttls = match self.offer_tls && !self.tls {
                    true => "250-STARTTLS\r\n",
                    false => "",
                };
                // AUTH only where the password cannot be read on the way.
                let auth = match self.offer_auth && self.tls && self.user.is_none() {
                    true => "250-AUTH PLAIN LOGIN\r\n",
                    false => "",
                };
                let reply = format!(
                    "250-{h}\r\n250-PIPELINING\r\n250-SIZE {max}\r\n250-8BITMIME\r\n\
                     {starttls}{auth}250 ENHANCEDSTATUSCODES\r\n"
                );
                self.errors = 0;
                out.push(Output::Reply(reply));
            }
            Request::Helo { host } => {
                self.helo = Some(host.into_owned());
                self.tx = None;
                let reply = format!("250 {}", self.cfg.hostname);
                self.reply(&reply, out);
            }
            Request::Mail { from } => self.mail(from, raw_path, out),
            Request::Rcpt { to } => self.rcpt(to, raw_path, out),
            Request::Data => self.data(out),
            Request::Rset => {
                self.tx = None;
                self.reply("250 2.0.0 Ok", out);
            }
            Request::Noop { .. } => self.reply("250 2.0.0 Ok", out),
            Request::Quit => {
                let reply = format!("221 2.0.0 {} Bye\r\n", self.cfg.hostname);
                self.close(reply, out);
            }
            Request::Vrfy { .. } => self.reply(
                "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
                out,
            ),
            Request::Help { .. } => self.reply(
                "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP",
                out,
            ),
            _ => self.error("502 5.5.1 Command not implemented", out),
        }
    }

    /// STARTTLS (RFC 3207): only when offered, once, without arguments,
    /// and with nothing pipelined behind it — commands sent in plaintext
    /// after STARTTLS would otherwise run as if they came over TLS (the
    /// command-injection flaw of CVE-2011-0411), so such a client is
    /// refused and disconnected.
    fn starttls(&mut self, line: &[u8], pipelined: bool, out: &mut Vec<Output>) {
        if !self.offer_tls {
            return self.error("502 5.5.1 Command not implemented", out);
        }
        if self.tls {
            return self.error("503 5.5.1 Error: TLS already active", out);
        }
        let args = line[8..].iter().any(|b| !b.is_ascii_whitespace());
        if args {
            return self.error("501 5.5.4 Syntax: STARTTLS", out);
        }
        if self.helo.is_none() {
            return self.error("503 5.5.1 Error: send EHLO first", out);
        }
        if pipelined {
            let host = &self.cfg.hostname;
            let reply = format!("554 5.5.1 {host} Error: command pipelining after STARTTLS\r\n");
            return self.close(reply, out);
        }
        out.push(Output::Reply("220 2.0.0 Ready to start TLS\r\n".into()));
        out.push(Output::StartTls);
        self.mode = Mode::Handshake;
        self.buf.clear();
    }

    /// A successful single-line reply; `text` without CRLF.
    fn reply(&mut self, text: &str, out: &mut Vec<Output>) {
        if !text.starts_with(['4', '5']) {
            self.errors = 0;
        }
        out.push(Output::Reply(format!("{text}\r\n")));
    }

    /// A failed command; too many in a row and the client is dropped.
    fn error(&mut self, text: &str, out: &mut Vec<Output>) {
        out.push(Output::Reply(format!("{text}\r\n")));
        self.errors += 1;
        if self.errors > MAX_ERRORS {
            let host = &self.cfg.hostname;
            self.close(format!("421 4.7.0 {host} Error: too many errors\r\n"), out);
        }
    }
}

/// The command verb: the first word, leading spaces skipped.
fn verb(line: &[u8]) -> &[u8] {
    let start = line.iter().position(|&b| b != b' ').unwrap_or(line.len());
    let line = &line[start..];
    let end = line
        .iter()
        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(line.len());
    &line[..end]
}

/// Client text echoed in a reply must not break the reply's framing.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect()
}

#[path = "session_auth.rs"]
mod authenticate;
#[path = "session_envelope.rs"]
mod envelope;

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "session_tls_tests.rs"]
mod tls_tests;
