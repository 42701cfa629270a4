//! A scripted SMTP server on 127.0.0.1 for tests: real sockets, behaviour
//! chosen per test, every accepted message recorded. Tests await its
//! counters (`wait`) instead of sleeping.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A fault that hits the first `connections` connections once each has
/// completed `after` messages.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    /// Messages completed on the connection before the fault.
    pub after: usize,
    /// How many connections (in accept order) suffer it.
    pub connections: usize,
}

impl Fault {
    /// On every connection, after `after` messages.
    pub fn always(after: usize) -> Self {
        Self {
            after,
            connections: usize::MAX,
        }
    }

    /// On the first connection only, after `after` messages.
    pub fn first(after: usize) -> Self {
        Self {
            after,
            connections: 1,
        }
    }

    fn hits(&self, conn: usize, done: usize) -> bool {
        conn < self.connections && done >= self.after
    }
}

/// How the peer behaves. The default accepts everything with PIPELINING.
#[derive(Debug, Clone)]
pub struct Behavior {
    /// Advertise PIPELINING.
    pub pipelining: bool,
    /// The reply to every MAIL FROM instead of 250 (e.g. reject them all).
    pub mail_reply: Option<String>,
    /// RCPT replies by address substring; the first match wins, else 250.
    pub rcpt_rules: Vec<(String, String)>,
    /// The reply to DATA instead of 354 (when some recipient was accepted).
    pub data_reply: Option<String>,
    /// The final reply after the content instead of 250; nothing is recorded.
    pub final_reply: Option<String>,
    /// Stop answering at the next command (EHLO and HELO still answered).
    pub stall: Option<Fault>,
    /// Take the next message's content but never answer it.
    pub stall_final: Option<Fault>,
    /// Answer the next MAIL with 421 and close.
    pub close_421: Option<Fault>,
    /// Answer the next MAIL one byte at a time, this far apart: never
    /// silent for long, never done.
    pub dribble: Option<(Fault, std::time::Duration)>,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            pipelining: true,
            mail_reply: None,
            rcpt_rules: Vec::new(),
            data_reply: None,
            final_reply: None,
            stall: None,
            stall_final: None,
            close_421: None,
            dribble: None,
        }
    }
}

impl Behavior {
    /// Every RCPT gets `reply`.
    pub fn rcpt_reply(reply: &str) -> Self {
        Self {
            rcpt_rules: vec![(String::new(), reply.to_string())],
            ..Self::default()
        }
    }
}

/// One accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Connection number, from 0 in accept order.
    pub conn: usize,
    /// The client's address on that connection.
    pub client: SocketAddr,
    /// The MAIL FROM address.
    pub mail_from: String,
    /// The MAIL FROM parameters (SIZE=…, BODY=…).
    pub mail_params: String,
    /// Accepted recipients.
    pub rcpts: Vec<String>,
    /// The content, dot-stuffing undone, without the final dot line.
    pub body: Vec<u8>,
    /// MAIL arrived together with the following commands.
    pub pipelined: bool,
}

/// Counters the tests wait on.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Messages accepted.
    pub messages: usize,
    /// Connections accepted.
    pub connections: usize,
    /// Connections now open.
    pub open: usize,
    /// Most connections open at once.
    pub max_open: usize,
    /// Connections that ended.
    pub closed: usize,
    /// QUIT commands received.
    pub quits: usize,
    /// Message contents taken and left unanswered (`stall_final`).
    pub held: usize,
}

/// A running scripted peer.
pub struct Peer {
    /// Where it listens.
    pub addr: SocketAddr,
    messages: Arc<Mutex<Vec<Message>>>,
    stats: watch::Sender<Stats>,
}

impl Peer {
    /// Start a peer with `behavior` on an ephemeral loopback port.
    pub async fn start(behavior: Behavior) -> Self {
        Self::start_at("127.0.0.1:0".parse().unwrap(), behavior).await
    }

    /// Start a peer with `behavior` on `addr` (a next hop configured
    /// before it listens).
    pub async fn start_at(addr: SocketAddr, behavior: Behavior) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (stats, _) = watch::channel(Stats::default());
        let peer = Self {
            addr,
            messages: messages.clone(),
            stats: stats.clone(),
        };
        let behavior = Arc::new(behavior);
        tokio::spawn(async move {
            let mut conn = 0;
            while let Ok((stream, client)) = listener.accept().await {
                stats.send_modify(|s| {
                    s.connections += 1;
                    s.open += 1;
                    s.max_open = s.max_open.max(s.open);
                });
                let c = Connection {
                    conn,
                    client,
                    behavior: behavior.clone(),
                    messages: messages.clone(),
                    stats: stats.clone(),
                    done: 0,
                };
                tokio::spawn(c.run(stream));
                conn += 1;
            }
        });
        peer
    }

    /// Everything accepted so far.
    pub fn messages(&self) -> Vec<Message> {
        self.messages.lock().unwrap().clone()
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.stats.borrow().clone()
    }

    /// Wait until the counters satisfy `f`.
    pub async fn wait(&self, f: impl Fn(&Stats) -> bool) -> Stats {
        let mut rx = self.stats.subscribe();
        let s = rx.wait_for(|s| f(s)).await.unwrap();
        s.clone()
    }

    /// Wait until `n` messages have been accepted.
    pub async fn wait_messages(&self, n: usize) -> Vec<Message> {
        self.wait(|s| s.messages >= n).await;
        self.messages()
    }
}

struct Connection {
    conn: usize,
    client: SocketAddr,
    behavior: Arc<Behavior>,
    messages: Arc<Mutex<Vec<Message>>>,
    stats: watch::Sender<Stats>,
    done: usize,
}

impl Connection {
    async fn run(mut self, mut stream: TcpStream) {
        let _ = self.session(&mut stream).await;
        self.stats.send_modify(|s| {
            s.open -= 1;
            s.closed += 1;
        });
    }

    async fn session(&mut self, stream: &mut TcpStream) -> std::io::Result<()> {
        let b = self.behavior.clone();
        let mut buf = Vec::new();
        let mut tx: Option<Message> = None;
        stream
            .write_all(b"220 peer.test ESMTP scripted\r\n")
            .await?;
        loop {
            let Some(line) = next_line(stream, &mut buf).await? else {
                return Ok(());
            };
            let upper = line.to_ascii_uppercase();
            let hello = upper.starts_with("EHLO") || upper.starts_with("HELO");
            if !hello && b.stall.is_some_and(|f| f.hits(self.conn, self.done)) {
                continue;
            }
            let reply: String = if upper.starts_with("EHLO") {
                tx = None;
                let pipe = if b.pipelining {
                    "250-PIPELINING\r\n"
                } else {
                    ""
                };
                format!("250-peer.test\r\n{pipe}250-8BITMIME\r\n250 SIZE 10000000")
            } else if upper.starts_with("HELO") {
                "250 peer.test".into()
            } else if upper.starts_with("MAIL FROM:") {
                if b.close_421.is_some_and(|f| f.hits(self.conn, self.done)) {
                    stream.write_all(b"421 4.3.2 peer.test closing\r\n").await?;
                    return Ok(());
                }
                match &b.mail_reply {
                    Some(r) => r.clone(),
                    None => {
                        let (addr, params) = path(&line[10..]);
                        tx = Some(Message {
                            conn: self.conn,
                            client: self.client,
                            mail_from: addr,
                            mail_params: params,
                            rcpts: Vec::new(),
                            body: Vec::new(),
                            pipelined: !buf.is_empty(),
                        });
                        "250 2.1.0 Ok".into()
                    }
                }
            } else if upper.starts_with("RCPT TO:") {
                let (addr, _) = path(&line[8..]);
                match (
                    &mut tx,
                    b.rcpt_rules.iter().find(|(k, _)| addr.contains(k.as_str())),
                ) {
                    (None, _) => "503 5.5.1 need MAIL".into(),
                    (Some(_), Some((_, r))) => r.clone(),
                    (Some(t), None) => {
                        t.rcpts.push(addr);
                        "250 2.1.5 Ok".into()
                    }
                }
            } else if upper == "DATA" {
                match &tx {
                    None => "503 5.5.1 need MAIL".into(),
                    Some(t) if t.rcpts.is_empty() => "554 5.5.1 no valid recipients".into(),
                    Some(_) if b.data_reply.is_some() => b.data_reply.clone().unwrap(),
                    Some(_) => {
                        stream.write_all(b"354 go ahead\r\n").await?;
                        let body = read_body(stream, &mut buf).await?;
                        let mut t = tx.take().unwrap();
                        t.body = body;
                        if b.stall_final.is_some_and(|f| f.hits(self.conn, self.done)) {
                            // Hold the connection open and say nothing more.
                            self.stats.send_modify(|s| s.held += 1);
                            while next_line(stream, &mut buf).await?.is_some() {}
                            return Ok(());
                        }
                        self.done += 1;
                        if let Some(r) = &b.final_reply {
                            r.clone()
                        } else {
                            self.messages.lock().unwrap().push(t);
                            self.stats.send_modify(|s| s.messages += 1);
                            "250 2.0.0 Ok: queued".into()
                        }
                    }
                }
            } else if upper == "RSET" {
                tx = None;
                "250 2.0.0 Ok".into()
            } else if upper == "NOOP" {
                "250 2.0.0 Ok".into()
            } else if upper == "QUIT" {
                self.stats.send_modify(|s| s.quits += 1);
                stream.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            } else {
                "500 5.5.2 what?".into()
            };
            let reply = format!("{reply}\r\n");
            let slow = b.dribble.filter(|(f, _)| f.hits(self.conn, self.done));
            match slow {
                Some((_, pause)) if upper.starts_with("MAIL FROM:") => {
                    for byte in reply.as_bytes() {
                        stream.write_all(&[*byte]).await?;
                        tokio::time::sleep(pause).await;
                    }
                }
                _ => stream.write_all(reply.as_bytes()).await?,
            }
        }
    }
}

/// `<addr> params` → (addr, params).
fn path(s: &str) -> (String, String) {
    let s = s.trim();
    match (s.find('<'), s.find('>')) {
        (Some(a), Some(b)) if a < b => (s[a + 1..b].to_string(), s[b + 1..].trim().to_string()),
        _ => (s.to_string(), String::new()),
    }
}

/// The next CRLF-terminated line, without CRLF; None at EOF.
async fn next_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    let line = next_line_bytes(stream, buf).await?;
    Ok(line.map(|l| String::from_utf8_lossy(&l).into_owned()))
}

/// Message content up to the lone dot, dot-stuffing undone.
async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let Some(line) = next_line_bytes(stream, buf).await? else {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        };
        if line == b"." {
            return Ok(body);
        }
        let line = line.strip_prefix(b".").unwrap_or(&line);
        body.extend_from_slice(line);
        body.extend_from_slice(b"\r\n");
    }
}

async fn next_line_bytes(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf[..i].to_vec();
            buf.drain(..i + 2);
            return Ok(Some(line));
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
