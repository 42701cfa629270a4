//! The outbound SMTP client machine: server bytes in, commands and results
//! out. No sockets and no clocks; the association driver feeds it.
//!
//! One machine is one session: greeting, EHLO (HELO fallback), any number of
//! transactions, QUIT. With PIPELINING a transaction's MAIL, RCPTs and DATA
//! go out in one write (RFC 2920) and the replies are matched in order.

use std::collections::VecDeque;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::{
    EhloResponse, Error as ProtoError, EXT_8BIT_MIME, EXT_PIPELINING, EXT_SIZE, EXT_START_TLS,
};

use super::{JobRcpt, Outcome, RcptResult};

/// One complete server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The reply as one line, e.g. `250 2.0.0 Ok`.
    pub text: String,
}

impl Reply {
    /// A reply made up locally, for failures the server never answered.
    pub fn local(code: u16, text: impl Into<String>) -> Self {
        let text = text.into();
        Self {
            code,
            text: format!("{code} {text}"),
        }
    }

    fn from_proto(r: smtp_proto::Response<String>) -> Self {
        let mut text = r.code.to_string();
        if r.esc[0] != 0 {
            text.push_str(&format!(" {}.{}.{}", r.esc[0], r.esc[1], r.esc[2]));
        }
        // Multi-line replies become one line: results end up in single-line
        // log fields and DSN Diagnostic-Code headers.
        for line in r.message.split('\n').filter(|l| !l.is_empty()) {
            text.push(' ');
            text.push_str(line.trim_end());
        }
        Self { code: r.code, text }
    }

    /// Whether this is a 2xx reply.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// What this reply means for a recipient it decides.
    pub fn outcome(&self) -> Outcome {
        match self.code / 100 {
            2 => Outcome::Delivered,
            // 530: the server wants TLS or authentication first — a matter
            // of how we connect, not of the mail: it waits.
            5 if self.code == 530 => Outcome::Deferred,
            5 => Outcome::Failed,
            _ => Outcome::Deferred,
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The extensions of the server that this client uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// RFC 2920 command pipelining.
    pub pipelining: bool,
    /// RFC 1870 SIZE: `Some(0)` when offered without a limit.
    pub size: Option<usize>,
    /// RFC 6152 8BITMIME.
    pub eight_bit_mime: bool,
    /// RFC 3207 STARTTLS.
    pub starttls: bool,
}

/// Whether the session should switch to TLS with STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WantTls {
    /// Never.
    No,
    /// When the server offers it; otherwise go on in plaintext.
    IfOffered,
    /// Always: a server that does not offer it or refuses it ends the
    /// session (the mail waits; it never goes in plaintext).
    Must,
}

/// A finished transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxDone {
    /// One result per job recipient, in job order.
    pub results: Vec<RcptResult>,
    /// False when the server refused the transaction as a whole (MAIL or
    /// RSET rejected): the association made no progress.
    pub progress: bool,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The greeting or EHLO/HELO was refused; no transaction happened.
    Refused(Reply),
    /// The server is closing the channel (421) or broke the session.
    Closing(Reply),
    /// The server sent something that is not SMTP.
    Protocol(String),
    /// QUIT was answered.
    Quit,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the server.
    Send(Bytes),
    /// Greeting and EHLO/HELO are done: jobs can be started.
    Established(Capabilities),
    /// The server agreed to STARTTLS: run the TLS handshake on the
    /// connection, then call [`Client::tls_started`].
    StartTls,
    /// The transaction in hand has finished.
    Done(TxDone),
    /// The session is over; close the connection.
    Closed(SessionEnd),
}

/// Misuse of the machine by its driver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A job was started while the session was not ready for one.
    #[error("the session is not ready for a transaction")]
    NotReady,
}

/// Which reply the machine waits for next, in send order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Rset,
    Mail,
    Rcpt(usize),
    Data,
    /// The final reply after the message content.
    Final,
    /// The reply to a lone "." sent when DATA got 354 but no recipient was
    /// accepted; it decides nothing.
    Discard,
}

#[derive(Debug)]
struct Tx {
    sender: String,
    rcpts: Vec<JobRcpt>,
    body: Bytes,
    pipelined: bool,
    expect: VecDeque<Expect>,
    mail: Option<Reply>,
    rcpt_replies: Vec<Option<Reply>>,
    data: Option<Reply>,
}

impl Tx {
    fn any_accepted(&self) -> bool {
        self.rcpt_replies.iter().flatten().any(Reply::is_positive)
    }

    fn mail_ok(&self) -> bool {
        !matches!(&self.mail, Some(m) if !m.is_positive())
    }

    /// Results once the server has said all it will; `cut` is a reply that
    /// ended the transaction early (421, protocol error, lost connection)
    /// and decides every recipient not already decided by its RCPT reply.
    fn results(&self, cut: Option<&Reply>) -> Vec<RcptResult> {
        self.rcpts
            .iter()
            .zip(&self.rcpt_replies)
            .map(|(rcpt, rr)| {
                let decided = match (&self.mail, rr) {
                    (Some(m), _) if !m.is_positive() => Some(m),
                    (_, Some(r)) if !r.is_positive() => Some(r),
                    (_, Some(_)) => self.data.as_ref().or(cut),
                    (_, None) => cut,
                };
                let reply = decided.cloned().unwrap_or_else(|| {
                    Reply::local(451, "4.4.2 transaction ended without a reply")
                });
                RcptResult {
                    index: rcpt.index,
                    outcome: reply.outcome(),
                    reply: reply.text,
                }
            })
            .collect()
    }
}

#[derive(Debug)]
enum State {
    Greeting,
    Ehlo,
    Helo,
    /// STARTTLS sent; waiting for its 220.
    StartTls,
    /// The driver runs the handshake.
    Handshake,
    Ready,
    Tx(Box<Tx>),
    Quit,
    Closed,
}

/// One outbound SMTP session.
pub struct Client {
    helo_name: String,
    state: State,
    rx: ResponseReceiver,
    /// Bytes of the reply being parsed, kept for `EhloResponse::parse`.
    raw: Vec<u8>,
    caps: Capabilities,
    /// A transaction failed part-way: the server may still hold its state.
    needs_rset: bool,
    want_tls: WantTls,
    /// The connection is encrypted.
    tls: bool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("state", &self.state)
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A session that waits for the server greeting, in plaintext.
    pub fn new(helo_name: impl Into<String>) -> Self {
        Self::with_tls(helo_name, WantTls::No)
    }

    /// A session that waits for the server greeting and switches to TLS
    /// as `want` says.
    pub fn with_tls(helo_name: impl Into<String>, want: WantTls) -> Self {
        Self {
            helo_name: helo_name.into(),
            state: State::Greeting,
            rx: ResponseReceiver::default(),
            raw: Vec::new(),
            caps: Capabilities::default(),
            needs_rset: false,
            want_tls: want,
            tls: false,
        }
    }

    /// The handshake after STARTTLS succeeded: the session starts over
    /// with EHLO (RFC 3207 §4.2: forget what the server said before).
    pub fn tls_started(&mut self) -> Vec<Action> {
        if !matches!(self.state, State::Handshake) {
            return Vec::new();
        }
        self.tls = true;
        self.caps = Capabilities::default();
        self.rx.reset();
        self.raw.clear();
        self.state = State::Ehlo;
        vec![send(format!("EHLO {}\r\n", self.helo_name))]
    }

    /// Whether the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The server's extensions, once established.
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// Whether a job can be started now.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready)
    }

    /// Whether a transaction is in hand.
    pub fn in_transaction(&self) -> bool {
        matches!(self.state, State::Tx(_))
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Feed bytes read from the server.
    pub fn receive(&mut self, mut bytes: &[u8]) -> Vec<Action> {
        let mut out = Vec::new();
        while !bytes.is_empty() && !self.is_closed() {
            let mut iter = bytes.iter();
            let parsed = self.rx.parse(&mut iter);
            let rest = iter.as_slice();
            if matches!(self.state, State::Ehlo) {
                self.raw
                    .extend_from_slice(&bytes[..bytes.len() - rest.len()]);
            }
            bytes = rest;
            match parsed {
                Ok(r) => {
                    self.rx.reset();
                    let raw = std::mem::take(&mut self.raw);
                    self.on_reply(Reply::from_proto(r), &raw, &mut out);
                }
                Err(ProtoError::NeedsMoreData { .. }) => break,
                Err(e) => {
                    let detail = format!("unparsable reply from server: {e:?}");
                    self.end_tx(&Reply::local(451, format!("4.5.0 {detail}")), &mut out);
                    self.close(SessionEnd::Protocol(detail), &mut out);
                }
            }
        }
        out
    }

    /// Start a transaction for `rcpts` (non-empty) with `body` (CRLF line
    /// endings, not dot-stuffed).
    pub fn start(
        &mut self,
        sender: &str,
        rcpts: &[JobRcpt],
        body: Bytes,
    ) -> Result<Vec<Action>, ClientError> {
        if !self.is_ready() {
            return Err(ClientError::NotReady);
        }
        if let Some(limit) = self.caps.size.filter(|&l| l > 0 && body.len() > l) {
            // The server told us its limit; asking would only waste a round trip.
            let reply = Reply::local(
                552,
                format!("5.3.4 message size exceeds the next hop's limit of {limit}"),
            );
            let results = rcpts
                .iter()
                .map(|r| RcptResult {
                    index: r.index,
                    outcome: Outcome::Failed,
                    reply: reply.text.clone(),
                })
                .collect();
            return Ok(vec![Action::Done(TxDone {
                results,
                progress: true,
            })]);
        }
        let mut tx = Box::new(Tx {
            sender: sender.to_string(),
            rcpts: rcpts.to_vec(),
            body,
            pipelined: self.caps.pipelining,
            expect: VecDeque::new(),
            mail: None,
            rcpt_replies: vec![None; rcpts.len()],
            data: None,
        });
        let mut cmd = BytesMut::new();
        if std::mem::take(&mut self.needs_rset) {
            cmd.put_slice(b"RSET\r\n");
            tx.expect.push_back(Expect::Rset);
        }
        if tx.pipelined || tx.expect.is_empty() {
            self.put_mail(&mut tx, &mut cmd);
        }
        if tx.pipelined {
            for i in 0..tx.rcpts.len() {
                put_rcpt(&mut tx, i, &mut cmd);
            }
            cmd.put_slice(b"DATA\r\n");
            tx.expect.push_back(Expect::Data);
        }
        self.state = State::Tx(tx);
        Ok(vec![Action::Send(cmd.freeze())])
    }

    /// End the session politely; the driver may close after sending.
    pub fn quit(&mut self) -> Bytes {
        self.state = State::Quit;
        Bytes::from_static(b"QUIT\r\n")
    }

    /// The connection broke (EOF, I/O error): results for the transaction
    /// in hand, every recipient not yet decided deferred with `reply`.
    pub fn abort(&mut self, reply: &Reply) -> Option<TxDone> {
        let mut out = Vec::new();
        self.end_tx(reply, &mut out);
        self.state = State::Closed;
        out.into_iter().find_map(|a| match a {
            Action::Done(d) => Some(d),
            _ => None,
        })
    }

    fn put_mail(&self, tx: &mut Tx, cmd: &mut BytesMut) {
        cmd.put_slice(format!("MAIL FROM:<{}>", tx.sender).as_bytes());
        if self.caps.size.is_some() {
            cmd.put_slice(format!(" SIZE={}", tx.body.len()).as_bytes());
        }
        if self.caps.eight_bit_mime && tx.body.iter().any(|b| *b >= 0x80) {
            cmd.put_slice(b" BODY=8BITMIME");
        }
        cmd.put_slice(b"\r\n");
        tx.expect.push_back(Expect::Mail);
    }

    fn on_reply(&mut self, reply: Reply, raw: &[u8], out: &mut Vec<Action>) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Greeting if reply.code == 220 => {
                self.state = State::Ehlo;
                out.push(send(format!("EHLO {}\r\n", self.helo_name)));
            }
            State::Ehlo if reply.code == 250 => {
                if let Ok(ehlo) = EhloResponse::parse(&mut raw.iter()) {
                    self.caps = Capabilities {
                        pipelining: ehlo.capabilities & EXT_PIPELINING != 0,
                        size: (ehlo.capabilities & EXT_SIZE != 0).then_some(ehlo.size),
                        eight_bit_mime: ehlo.capabilities & EXT_8BIT_MIME != 0,
                        starttls: ehlo.capabilities & EXT_START_TLS != 0,
                    };
                }
                match (self.want_tls, self.tls, self.caps.starttls) {
                    (WantTls::No, ..) | (_, true, _) => self.established(out),
                    (_, false, true) => {
                        self.state = State::StartTls;
                        out.push(send("STARTTLS\r\n".to_string()));
                    }
                    (WantTls::IfOffered, false, false) => self.established(out),
                    (WantTls::Must, false, false) => self.tls_refused("not offered", out),
                }
            }
            // Without EHLO there is no STARTTLS.
            State::Ehlo if reply.code / 100 == 5 && self.want_tls == WantTls::Must => {
                self.tls_refused(&format!("EHLO refused: {reply}"), out)
            }
            State::Ehlo if reply.code / 100 == 5 => {
                self.state = State::Helo;
                out.push(send(format!("HELO {}\r\n", self.helo_name)));
            }
            State::StartTls if reply.code == 220 => {
                self.state = State::Handshake;
                out.push(Action::StartTls);
            }
            State::StartTls if reply.code == 421 => self.close(SessionEnd::Closing(reply), out),
            State::StartTls if self.want_tls == WantTls::Must => {
                self.tls_refused(&format!("refused: {reply}"), out)
            }
            // Still in the EHLO state: go on without TLS.
            State::StartTls => self.established(out),
            State::Handshake => {
                let detail = format!("reply during the TLS handshake: {reply}");
                self.close(SessionEnd::Protocol(detail), out);
            }
            State::Helo if reply.is_positive() => {
                self.state = State::Ready;
                out.push(Action::Established(self.caps));
            }
            State::Greeting | State::Ehlo | State::Helo => {
                self.close(SessionEnd::Refused(reply), out);
            }
            State::Ready if reply.code == 421 => self.close(SessionEnd::Closing(reply), out),
            State::Ready => {
                let detail = format!("unexpected reply while idle: {reply}");
                self.close(SessionEnd::Protocol(detail), out);
            }
            State::Tx(tx) => self.on_tx_reply(tx, reply, out),
            State::Quit => self.close(SessionEnd::Quit, out),
            State::Closed => {}
        }
    }

    fn established(&mut self, out: &mut Vec<Action>) {
        self.state = State::Ready;
        out.push(Action::Established(self.caps));
    }

    /// The route requires TLS and this server will not give it: the
    /// session ends as refused, with a 4xx so the mail waits.
    fn tls_refused(&mut self, why: &str, out: &mut Vec<Action>) {
        let reply = Reply::local(
            451,
            format!("4.7.4 TLS required by the route; STARTTLS {why}"),
        );
        self.close(SessionEnd::Refused(reply), out);
    }

    fn on_tx_reply(&mut self, mut tx: Box<Tx>, reply: Reply, out: &mut Vec<Action>) {
        let Some(expect) = tx.expect.pop_front() else {
            self.state = State::Tx(tx);
            let detail = format!("unexpected reply: {reply}");
            self.end_tx(&Reply::local(451, format!("4.5.0 {detail}")), out);
            return self.close(SessionEnd::Protocol(detail), out);
        };
        if reply.code == 421 || (expect == Expect::Rset && !reply.is_positive()) {
            if expect == Expect::Rset {
                // The transaction never began: whatever RSET got, the mail
                // itself was not judged, so it waits rather than bounces.
                tx.mail = Some(Reply {
                    code: 451,
                    text: reply.text.clone(),
                });
            }
            self.state = State::Tx(tx);
            self.end_tx(&reply, out);
            return self.close(SessionEnd::Closing(reply), out);
        }
        let mut cmd = BytesMut::new();
        match expect {
            Expect::Rset => {
                if !tx.pipelined {
                    self.put_mail(&mut tx, &mut cmd);
                }
            }
            Expect::Mail => {
                let ok = reply.is_positive();
                tx.mail = Some(reply);
                if !tx.pipelined && ok {
                    put_rcpt(&mut tx, 0, &mut cmd);
                }
            }
            Expect::Rcpt(i) => {
                tx.rcpt_replies[i] = Some(reply);
                if !tx.pipelined && tx.mail_ok() {
                    if i + 1 < tx.rcpts.len() {
                        put_rcpt(&mut tx, i + 1, &mut cmd);
                    } else if tx.any_accepted() {
                        cmd.put_slice(b"DATA\r\n");
                        tx.expect.push_back(Expect::Data);
                    }
                }
            }
            Expect::Data if reply.code == 354 => {
                if tx.mail_ok() && tx.any_accepted() {
                    cmd.put_slice(&stuff(&tx.body));
                    tx.expect.push_back(Expect::Final);
                } else {
                    // RFC 2920 §3.1: a server that still said 354 gets an
                    // empty message, which it must not deliver.
                    cmd.put_slice(b".\r\n");
                    tx.expect.push_back(Expect::Discard);
                }
            }
            Expect::Data | Expect::Final => {
                let early = matches!(expect, Expect::Data) && reply.code < 400;
                let reply = if early {
                    // Anything but 354 or a refusal, before the content:
                    // nothing can have been delivered.
                    let text = format!(
                        "4.5.0 the next hop answered DATA with {} before the content was sent",
                        reply.code
                    );
                    Reply::local(451, text)
                } else {
                    reply
                };
                if tx.mail_ok() && tx.any_accepted() {
                    tx.data = Some(reply);
                }
            }
            Expect::Discard => {}
        }
        if !cmd.is_empty() {
            out.push(Action::Send(cmd.freeze()));
        }
        if !tx.expect.is_empty() {
            self.state = State::Tx(tx);
            return;
        }
        let clean = tx.mail_ok() && tx.data.as_ref().is_some_and(Reply::is_positive);
        self.needs_rset = !clean;
        out.push(Action::Done(TxDone {
            results: tx.results(None),
            progress: tx.mail_ok(),
        }));
        self.state = State::Ready;
    }

    /// Finish the transaction in hand, if any, with `cut` deciding the rest.
    fn end_tx(&mut self, cut: &Reply, out: &mut Vec<Action>) {
        if let State::Tx(tx) = std::mem::replace(&mut self.state, State::Closed) {
            out.push(Action::Done(TxDone {
                results: tx.results(Some(cut)),
                progress: tx.mail_ok(),
            }));
        }
    }

    fn close(&mut self, end: SessionEnd, out: &mut Vec<Action>) {
        self.state = State::Closed;
        out.push(Action::Closed(end));
    }
}

fn send(s: String) -> Action {
    Action::Send(Bytes::from(s))
}

fn put_rcpt(tx: &mut Tx, i: usize, cmd: &mut BytesMut) {
    cmd.put_slice(format!("RCPT TO:<{}>\r\n", tx.rcpts[i].address).as_bytes());
    tx.expect.push_back(Expect::Rcpt(i));
}

/// The message content as sent after DATA: dot-stuffed, ending in CRLF.CRLF.
pub fn stuff(body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + body.len() / 64 + 5);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.put_u8(b'.');
        }
        out.put_u8(b);
        at_line_start = b == b'\n';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        if body.ends_with(b"\r") {
            out.put_u8(b'\n');
        } else {
            out.put_slice(b"\r\n");
        }
    }
    out.put_slice(b".\r\n");
    out.freeze()
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
