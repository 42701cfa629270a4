//! The driver of associations: one task per association slot of a
//! destination. It connects, feeds the client machine, takes jobs from the
//! destination's ready queue and follows the pool policy; when a session
//! ends for a reason that calls for a replacement (renegotiation, stall,
//! error) and work remains, the same task negotiates the next one.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::client::{Action, Client, Reply, SessionEnd, WantTls};
use super::pool::{self, Next, Policy};
use super::ready::{Destination, Queued, Shared, WITHDRAWN};
use super::Outcome;
use crate::events::{self, AssociationEvent as Ev, AssociationReason as Why};

/// Why a connection ended when its source address was withdrawn.
const WITHDRAWN_TEXT: &str = "its source address was withdrawn";

/// Run one association slot of `dest` until it has nothing left to do or
/// the node shuts down; `reason` is why it was opened.
pub(crate) async fn run(shared: Arc<Shared>, dest: Arc<Destination>, mut reason: Why) {
    loop {
        let id = shared.next_id();
        let established = tokio::select! {
            r = establish(&shared, &dest) => r,
            _ = shared.cancel.cancelled() => break,
            _ = dest.fence.cancelled() => break,
        };
        let (conn, client) = match established {
            Ok(c) => c,
            Err(fail) => {
                // Even a 5xx greeting is about the next hop, not the mail:
                // defer, as for a refused connection, rather than bounce
                // a whole queue because one server is misconfigured.
                let failed = dest.retire_unreachable();
                for q in &failed {
                    shared.report_all(q, &fail.hop, Outcome::Deferred, &fail.reply.text);
                }
                let detail = format!("{} ({} jobs failed)", fail.reply, failed.len());
                events::association(Ev::Closed, id, &dest.name, &fail.hop, Why::Error, &detail);
                return;
            }
        };
        let hop = conn.hop.to_string();
        events::association(Ev::Opened, id, &dest.name, &hop, reason, "");
        dest.set_established(true);
        let mut session = Session {
            shared: &shared,
            dest: &dest,
            id,
            conn,
            client,
            pool: pool::Association::new(Instant::now()),
            policy: shared.policy(),
        };
        let (why, detail) = session.serve().await;
        dest.set_established(false);
        let replaced = matches!(why, Why::Count | Why::Lifetime) && dest.backlog() > 0;
        let kind = if replaced && !shared.cancel.is_cancelled() {
            Ev::Renegotiated
        } else {
            Ev::Closed
        };
        events::association(kind, id, &dest.name, &hop, why, &detail);
        if dest.retire(shared.cancel.is_cancelled() || dest.fence.is_cancelled()) {
            return;
        }
        // Work is waiting: this slot negotiates a fresh association. After
        // an idle close the new one is plain demand.
        reason = if why == Why::Idle { Why::Demand } else { why };
    }
    dest.retire(true);
}

/// Why no next hop could be used.
struct Unreachable {
    hop: String,
    reply: Reply,
}

/// The connection to a next hop: TCP, or TLS after STARTTLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(bytes).await,
            Stream::Tls(s) => s.write_all(bytes).await,
        }
    }
}

/// A connection to a next hop with its read buffer.
struct Conn {
    stream: Stream,
    hop: SocketAddr,
    buf: Vec<u8>,
    /// The destination's fence: once cancelled, every read and write fails.
    fence: CancellationToken,
}

/// Why reading or writing failed.
enum IoFail {
    /// No progress within the stall timeout.
    Timeout,
    /// The transaction's time is up, however steadily the peer answered.
    Overtime,
    /// EOF or a socket error.
    Lost(String),
}

impl IoFail {
    fn text(&self, stall: Duration) -> String {
        match self {
            Self::Timeout => format!("no progress within {stall:?}"),
            Self::Overtime => "the transaction took too long".into(),
            Self::Lost(e) => e.clone(),
        }
    }
}

impl Conn {
    /// Read whatever arrives and feed it to the client. Cancel-safe:
    /// dropping it before the read completes loses nothing.
    async fn read(&mut self, client: &mut Client) -> Result<Vec<Action>, IoFail> {
        let read = tokio::select! {
            r = self.stream.read(&mut self.buf) => r,
            _ = self.fence.cancelled() => return Err(IoFail::Lost(WITHDRAWN_TEXT.into())),
        };
        match read {
            Ok(0) => Err(IoFail::Lost("connection closed by the next hop".into())),
            Ok(n) => Ok(client.receive(&self.buf[..n])),
            Err(e) => Err(IoFail::Lost(os_error(&e))),
        }
    }

    async fn read_within(
        &mut self,
        client: &mut Client,
        limit: Duration,
    ) -> Result<Vec<Action>, IoFail> {
        timeout(limit, self.read(client))
            .await
            .unwrap_or(Err(IoFail::Timeout))
    }

    /// Like `read_within`, and never past `deadline`.
    async fn read_before(
        &mut self,
        client: &mut Client,
        limit: Duration,
        deadline: Instant,
    ) -> Result<Vec<Action>, IoFail> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.read_within(client, limit.min(left)).await {
            Err(IoFail::Timeout) if Instant::now() >= deadline => Err(IoFail::Overtime),
            other => other,
        }
    }

    /// Like `write_within`, and never past `deadline`.
    async fn write_before(
        &mut self,
        bytes: &Bytes,
        limit: Duration,
        deadline: Instant,
    ) -> Result<(), IoFail> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.write_within(bytes, limit.min(left)).await {
            Err(IoFail::Timeout) if Instant::now() >= deadline => Err(IoFail::Overtime),
            other => other,
        }
    }

    async fn write_within(&mut self, bytes: &Bytes, limit: Duration) -> Result<(), IoFail> {
        let written = tokio::select! {
            w = timeout(limit, self.stream.write_all(bytes)) => w,
            _ = self.fence.cancelled() => return Err(IoFail::Lost(WITHDRAWN_TEXT.into())),
        };
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(IoFail::Lost(os_error(&e))),
            Err(_) => Err(IoFail::Timeout),
        }
    }
}

/// An io::Error without the "(os error N)" suffix, for replies people read.
fn os_error(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

async fn connect(hop: SocketAddr, source: Option<std::net::IpAddr>) -> io::Result<TcpStream> {
    let socket = if hop.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = source {
        // The lesson of the wrong address: associations leave from the
        // configured source (a group's VIP), never whatever the kernel picks.
        socket.bind(SocketAddr::new(src, 0))?;
    }
    let stream = socket.connect(hop).await?;
    // Commands are written whole; waiting for Nagle only adds round trips.
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connect to the first next hop that answers and complete greeting,
/// EHLO/HELO and — as the route asks — STARTTLS with it. An opportunistic
/// handshake that fails is retried once in plaintext on a new connection;
/// a required one defers.
async fn establish(shared: &Shared, dest: &Destination) -> Result<(Conn, Client), Unreachable> {
    let mut last = Unreachable {
        hop: String::new(),
        reply: Reply::local(451, "4.4.0 the route has no next hop"),
    };
    for hop in dest.hops_now() {
        let mut want = dest.tls.want();
        loop {
            match session(shared, dest, hop, want).await {
                Ok(c) => return Ok(c),
                Err(Failed::Handshake(why)) if want == WantTls::IfOffered => {
                    tracing::warn!(%hop, error = %why, "TLS failed; plaintext for this association");
                    want = WantTls::No;
                }
                Err(Failed::Handshake(why)) => {
                    let text = format!("4.7.5 {hop}: TLS failed: {why}");
                    last = Unreachable {
                        hop: hop.to_string(),
                        reply: Reply::local(451, text),
                    };
                    break;
                }
                Err(Failed::Other(u)) => {
                    last = u;
                    break;
                }
            }
        }
    }
    Err(last)
}

/// Why one attempt at a session failed.
enum Failed {
    /// The TLS handshake after STARTTLS.
    Handshake(String),
    /// Anything else: connect, greeting, EHLO, a refusal.
    Other(Unreachable),
}

/// One attempt: connect to `hop`, greeting, EHLO, STARTTLS as `want` says.
async fn session(
    shared: &Shared,
    dest: &Destination,
    hop: SocketAddr,
    want: WantTls,
) -> Result<(Conn, Client), Failed> {
    let cfg = shared.cfg();
    let fail = |text: String| {
        Failed::Other(Unreachable {
            hop: hop.to_string(),
            reply: Reply::local(451, text),
        })
    };
    let stream = match timeout(cfg.connect_timeout, connect(hop, dest.source)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(fail(format!(
                "4.4.1 connect to {hop} failed: {}",
                os_error(&e)
            )))
        }
        Err(_) => return Err(fail(format!("4.4.1 connect to {hop} timed out"))),
    };
    let mut conn = Conn {
        stream: Stream::Plain(stream),
        hop,
        buf: vec![0; 16 * 1024],
        fence: dest.fence.clone(),
    };
    let mut client = Client::with_tls(shared.helo_name.clone(), want);
    let mut pending: std::collections::VecDeque<Action> = Default::default();
    // The greeting, EHLO and STARTTLS are bounded as a transaction is.
    let deadline = Instant::now() + cfg.transaction_timeout;
    loop {
        if pending.is_empty() {
            match conn
                .read_before(&mut client, cfg.stall_timeout, deadline)
                .await
            {
                Ok(a) => pending.extend(a),
                Err(IoFail::Lost(e)) => {
                    return Err(fail(format!("4.4.2 {hop}: {e} before the session began")))
                }
                Err(e) => {
                    let why = e.text(cfg.stall_timeout);
                    return Err(fail(format!("4.4.2 {hop}: {why} before the session began")));
                }
            }
        }
        while let Some(a) = pending.pop_front() {
            match a {
                Action::Send(b) => {
                    if let Err(e) = conn.write_before(&b, cfg.stall_timeout, deadline).await {
                        return Err(fail(format!("4.4.2 {hop}: {}", e.text(cfg.stall_timeout))));
                    }
                }
                Action::StartTls => {
                    conn = handshake(shared, dest, conn, cfg.stall_timeout)
                        .await
                        .map_err(Failed::Handshake)?;
                    pending.extend(client.tls_started());
                }
                Action::Established(_) => return Ok((conn, client)),
                Action::Closed(SessionEnd::Refused(r)) => {
                    return Err(Failed::Other(Unreachable {
                        hop: hop.to_string(),
                        reply: r,
                    }))
                }
                Action::Closed(end) => return Err(fail(format!("4.5.0 {hop}: {end:?}"))),
                Action::Done(_) => {}
            }
        }
    }
}

/// The TLS handshake on `conn`, within `limit`.
async fn handshake(
    shared: &Shared,
    dest: &Destination,
    conn: Conn,
    limit: Duration,
) -> Result<Conn, String> {
    let connector = shared.connectors.get(&dest.tls)?;
    let name = dest.tls.server_name(conn.hop)?;
    let Stream::Plain(tcp) = conn.stream else {
        return Err("TLS is already on".into());
    };
    match timeout(limit, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => Ok(Conn {
            stream: Stream::Tls(Box::new(tls)),
            ..conn
        }),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no handshake within {limit:?}")),
    }
}

/// How a transaction ended for the driver.
enum TxEnd {
    /// Results reported; `progress` as in `TxDone`.
    Done(bool),
    /// Nothing was sent (no recipients, unreadable body).
    Skipped,
    /// The session is over, with this reason and detail.
    End(Why, String),
}

/// One established association.
struct Session<'a> {
    shared: &'a Shared,
    dest: &'a Destination,
    id: u64,
    conn: Conn,
    client: Client,
    pool: pool::Association,
    /// The pool policy when the association opened: a reload applies to
    /// the next ones.
    policy: Policy,
}

impl Session<'_> {
    /// Serve the ready queue until the policy, the peer or shutdown ends
    /// the session; returns why, for the close event.
    async fn serve(&mut self) -> (Why, String) {
        let policy = self.policy.clone();
        loop {
            // Not even a QUIT leaves from a withdrawn address, nor from a
            // node whose delivery lease ended (it is about to be cut).
            if self.dest.fence.is_cancelled() || !self.shared.gate.is_open() {
                return (Why::Withdrawn, String::new());
            }
            if self.shared.cancel.is_cancelled() {
                self.quit().await;
                return (Why::Shutdown, String::new());
            }
            let now = Instant::now();
            let (next, job) = self
                .dest
                .decide(|backlog| policy.next(&self.pool, now, backlog));
            match (next, job) {
                (Next::Take { reused }, Some(job)) => {
                    if reused {
                        let hop = self.conn.hop.to_string();
                        events::association(
                            Ev::Reused,
                            self.id,
                            &self.dest.name,
                            &hop,
                            Why::Demand,
                            "",
                        );
                    }
                    self.pool.took();
                    match self.transact(job).await {
                        TxEnd::Done(progress) => self.pool.finished(Instant::now(), progress),
                        TxEnd::Skipped => {}
                        TxEnd::End(why, detail) => return (why, detail),
                    }
                }
                (Next::Take { .. }, None) => {}
                (Next::Wait { until }, _) => {
                    self.pool.idle(now);
                    if let Some(end) = self.wait(until).await {
                        return end;
                    }
                }
                (Next::Close(why) | Next::Renegotiate(why), _) => {
                    self.quit().await;
                    return (why, String::new());
                }
                (Next::Stall, _) => {
                    self.quit().await;
                    let detail =
                        format!("every transaction refused for {:?}", policy.stall_timeout);
                    return (Why::Stall, detail);
                }
            }
        }
    }

    /// Idle until work, `until`, shutdown, or the peer speaking or leaving.
    async fn wait(&mut self, until: Instant) -> Option<(Why, String)> {
        tokio::select! {
            _ = self.dest.work.notified() => None,
            _ = sleep_until(until) => None,
            _ = self.shared.cancel.cancelled() => None,
            _ = self.dest.fence.cancelled() => None,
            r = self.conn.read(&mut self.client) => {
                // A next hop that drops idle connections is normal, not an error.
                let detail = match r {
                    Ok(actions) => match actions.into_iter().find_map(closed) {
                        Some(end) => format!("{end:?}"),
                        None => return None,
                    },
                    Err(e) => e.text(self.policy.stall_timeout),
                };
                Some((Why::Idle, detail))
            }
        }
    }

    /// Carry one job: load its content, run the transaction, report.
    async fn transact(&mut self, q: Queued) -> TxEnd {
        let hop = self.conn.hop.to_string();
        if q.job.recipients.is_empty() {
            self.shared.report(&q, &hop, Vec::new());
            return TxEnd::Skipped;
        }
        // Never sent once expired: the queue bounces it on this answer.
        if q.job.expired(crate::clock::now_ms()) {
            let reply = "451 4.4.7 the message expired before it could be sent";
            self.shared.report_all(&q, &hop, Outcome::Deferred, reply);
            return TxEnd::Skipped;
        }
        let body = match self.shared.spool.body(q.job.id).await {
            Ok(b) => b,
            Err(e) => {
                let reply = format!("451 4.3.0 cannot read the message from the spool: {e}");
                self.shared.report_all(&q, &hop, Outcome::Deferred, &reply);
                return TxEnd::Skipped;
            }
        };
        let stall = self.policy.stall_timeout;
        let deadline = Instant::now() + self.policy.transaction_timeout;
        let mut actions = match self.client.start(&q.job.sender, &q.job.recipients, body) {
            Ok(a) => a,
            Err(e) => {
                self.requeue(q);
                return TxEnd::End(Why::Error, e.to_string());
            }
        };
        loop {
            let mut done = None;
            let mut end = None;
            for a in actions {
                match a {
                    Action::Send(b) => {
                        if let Err(e) = self.conn.write_before(&b, stall, deadline).await {
                            return self.broken(q, e);
                        }
                    }
                    Action::Done(d) => {
                        done = Some(d.progress);
                        // A hop that put the whole transaction off while
                        // a later one remains: the job goes there, now.
                        let deferred = d.results.iter().all(|r| r.outcome == Outcome::Deferred);
                        if deferred && !q.requeued && self.dest.avoid(self.conn.hop) {
                            let why = d.results.first().map(|r| r.reply.clone());
                            self.requeue(Queued {
                                requeued: true,
                                ..q
                            });
                            let why = why.unwrap_or_default();
                            return TxEnd::End(
                                Why::Error,
                                format!("{hop} deferred it: {why}; next hop"),
                            );
                        }
                        self.shared.report(&q, &hop, d.results);
                    }
                    Action::Closed(e) => end = Some(e),
                    // Only while establishing.
                    Action::Established(_) | Action::StartTls => {}
                }
            }
            match (done, end) {
                (_, Some(e)) => {
                    if done.is_none() {
                        // Closed without deciding the job: its outcome is unknown.
                        self.requeue(q);
                    }
                    return TxEnd::End(Why::Error, format!("{e:?}"));
                }
                (Some(progress), None) => return TxEnd::Done(progress),
                (None, None) => {}
            }
            actions = match self
                .conn
                .read_before(&mut self.client, stall, deadline)
                .await
            {
                Ok(a) => a,
                Err(e) => return self.broken(q, e),
            };
        }
    }

    /// The connection stalled or broke with `q` in hand.
    fn broken(&mut self, q: Queued, e: IoFail) -> TxEnd {
        let hop = self.conn.hop.to_string();
        let stall = self.policy.stall_timeout;
        match e {
            IoFail::Timeout => {
                let detail = format!("no progress within {stall:?}");
                if q.requeued {
                    let reply = format!("451 4.4.2 {hop} stalled twice on this message");
                    self.shared.report_all(&q, &hop, Outcome::Deferred, &reply);
                } else {
                    // Not the message's fault as far as we know: it goes
                    // first on the next association, not to the retry schedule.
                    self.requeue(Queued {
                        requeued: true,
                        ..q
                    });
                }
                TxEnd::End(Why::Stall, detail)
            }
            IoFail::Overtime => {
                // A next hop that answers, but too slowly to finish: not
                // put back for another association to wait on too.
                let limit = self.policy.transaction_timeout;
                let text = format!("4.4.2 {hop}: the transaction took longer than {limit:?}");
                let reply = Reply::local(451, text.clone());
                if let Some(d) = self.client.abort(&reply) {
                    self.shared.report(&q, &hop, d.results);
                }
                TxEnd::End(Why::Stall, text)
            }
            IoFail::Lost(e) => {
                let reply = Reply::local(451, format!("4.4.2 {hop}: {e}"));
                if let Some(d) = self.client.abort(&reply) {
                    self.shared.report(&q, &hop, d.results);
                }
                let why = if self.dest.fence.is_cancelled() {
                    Why::Withdrawn
                } else {
                    Why::Error
                };
                TxEnd::End(why, e)
            }
        }
    }

    /// Put `q` back in the ready queue, or report it deferred if the
    /// destination was withdrawn meanwhile.
    fn requeue(&self, q: Queued) {
        if let Some(q) = self.dest.requeue_front(q) {
            let hop = self.conn.hop.to_string();
            self.shared
                .report_all(&q, &hop, Outcome::Deferred, WITHDRAWN);
        }
    }

    /// Say goodbye; a peer that does not answer QUIT promptly is just closed.
    async fn quit(&mut self) {
        let limit = self.policy.stall_timeout.min(Duration::from_secs(10));
        let bytes = self.client.quit();
        if self.conn.write_within(&bytes, limit).await.is_err() {
            return;
        }
        while let Ok(actions) = self.conn.read_within(&mut self.client, limit).await {
            if actions.into_iter().any(|a| closed(a).is_some()) {
                return;
            }
        }
    }
}

fn closed(a: Action) -> Option<SessionEnd> {
    match a {
        Action::Closed(e) => Some(e),
        _ => None,
    }
}
