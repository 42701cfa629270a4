//! The socket side of inbound SMTP: listener set-up, an accept loop that
//! never waits on a client, and one task per connection driving a
//! [`Session`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::Credentials;
use super::clients::{ClientSlot, Clients, TooMany};
use super::memory::BodyMemory;
use super::session::{Output, Session, Verdict};
use super::Accept;
use crate::config::SmtpConfig;

/// Read buffer per connection; one read can carry a large pipelined batch.
const READ_BUF: usize = 16 * 1024;
/// Pause after a failed accept (EMFILE and friends) so we don't spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a closing connection keeps reading so the peer sees our last
/// reply and a FIN rather than a reset caused by unread input.
const LINGER: Duration = Duration::from_secs(2);

/// Bind a listening socket for SMTP.
///
/// Must be called inside a tokio runtime. IP_FREEBIND lets a node bind a
/// VIP that is not (yet) configured on an interface.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    let freebind = match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true),
        SocketAddr::V6(_) => socket.set_freebind_v6(true),
    };
    if let Err(e) = freebind {
        tracing::debug!(%addr, error = %e, "IP_FREEBIND not available");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    warn_if_backlog_capped(addr, backlog);
    TcpListener::from_std(socket.into())
}

/// The kernel silently caps the backlog at somaxconn; an operator who
/// asked for more should know they did not get it.
fn warn_if_backlog_capped(addr: SocketAddr, backlog: u32) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/core/somaxconn") else {
        return;
    };
    if let Ok(somaxconn) = text.trim().parse::<u32>() {
        if somaxconn < backlog {
            tracing::warn!(
                %addr,
                backlog,
                somaxconn,
                "listen backlog is capped by net.core.somaxconn; raise it with sysctl"
            );
        }
    }
}

/// Accept connections until `cancel`, running each session on `tracker`.
///
/// Returns once the listener is closed; open sessions finish on their own
/// (the caller closes and waits on the tracker).
pub async fn serve(
    listener: TcpListener,
    cfg: watch::Receiver<Arc<SmtpConfig>>,
    accept: Arc<dyn Accept>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let never = watch::channel(false).1;
    serve_draining(listener, cfg, accept, never, Away::Resting, cancel, tracker).await
}

/// What a draining listener tells new clients, so that its 421 says
/// what is true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Away {
    /// The service on this address moves to another node (a group's VIP
    /// is handed over).
    Moving,
    /// This node takes no new mail for now (it drains or stops); nothing
    /// says another node answers here.
    Resting,
}

/// Like [`serve`], and while `drain` is true, new clients are told 421 (the
/// service is moving) while open sessions go on until `cancel`.
pub async fn serve_draining(
    listener: TcpListener,
    cfg: watch::Receiver<Arc<SmtpConfig>>,
    accept: Arc<dyn Accept>,
    drain: watch::Receiver<bool>,
    away: Away,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let plain = Listener {
        cfg,
        accept,
        drain,
        away,
        cancel,
        // Only a node's own listeners hear of its stop (serve_listener).
        stopping: CancellationToken::new(),
        tracker,
        implicit_tls: false,
        clients: Arc::default(),
    };
    serve_listener(listener, plain).await
}

/// What an accept loop serves with.
pub struct Listener {
    /// The settings, as reloads change them.
    pub cfg: watch::Receiver<Arc<SmtpConfig>>,
    /// Where messages go.
    pub accept: Arc<dyn Accept>,
    /// While true, new clients get 421.
    pub drain: watch::Receiver<bool>,
    /// What new clients are told while it drains.
    pub away: Away,
    /// Stops accepting; open sessions get 421.
    pub cancel: CancellationToken,
    /// The node stops: sessions between transactions get 421 at once.
    pub stopping: CancellationToken,
    /// Where sessions run.
    pub tracker: TaskTracker,
    /// TLS from the first byte (RFC 8314, port 465 style): the handshake
    /// comes first, then SMTP inside it; without a certificate that
    /// loads, connections are closed.
    pub implicit_tls: bool,
    /// Sessions and budgets per client address, shared by the node's
    /// listeners so that more ports do not mean more guesses.
    pub clients: Arc<Clients>,
}

/// Accept connections on `listener` until cancelled, as `l` says.
pub async fn serve_listener(listener: TcpListener, l: Listener) {
    let Listener {
        cfg,
        accept,
        drain,
        away,
        cancel,
        stopping,
        tracker,
        implicit_tls,
        clients,
    } = l;
    let open = Arc::new(AtomicUsize::new(0));
    let mut secrets = Secrets::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        // Never await a permit here: the loop must keep accepting so
        // that excess clients get a 421 instead of a hang in the backlog.
        // A draining listener takes no new sessions at all.
        // Each session runs on the configuration current when it began;
        // a reload applies to the next ones.
        let now = cfg.borrow().clone();
        let draining = drain.borrow().then_some(away);
        let slot = admit(&now, &open, &clients, peer, draining);
        let (acceptor, creds) = secrets.get(&now);
        let tls = match (implicit_tls, acceptor) {
            (false, a) => Tls::Offer(a),
            (true, Some(a)) => Tls::Implicit(a),
            // No certificate: nothing to speak on this port.
            (true, None) => continue,
        };
        let member = clients.is_member(peer.ip());
        tracker.spawn(connection(
            stream,
            (peer, member),
            slot,
            now,
            tls,
            creds,
            accept.clone(),
            clients.memory.clone(),
            (cancel.clone(), stopping.clone()),
        ));
    }
    drop(listener);
    tracing::debug!("smtp listener closed");
}

/// The STARTTLS acceptor and AUTH credentials for the configuration in
/// force, loaded again when a reload brings a new one (a renewed
/// certificate, a changed password file).
#[derive(Default)]
struct Secrets {
    loaded_for: Option<Arc<SmtpConfig>>,
    acceptor: Option<TlsAcceptor>,
    creds: Option<Arc<Credentials>>,
}

impl Secrets {
    fn get(&mut self, cfg: &Arc<SmtpConfig>) -> (Option<TlsAcceptor>, Option<Arc<Credentials>>) {
        if !self
            .loaded_for
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, cfg))
        {
            self.loaded_for = Some(cfg.clone());
            let tls = cfg.tls.as_ref().map(super::tls::acceptor);
            self.acceptor = renewed(tls, self.acceptor.take(), "certificate");
            let creds = cfg
                .auth
                .as_deref()
                .map(|p| Credentials::load(p).map(Arc::new));
            self.creds = renewed(creds, self.creds.take(), "credentials");
        }
        (self.acceptor.clone(), self.creds.clone())
    }
}

/// What was just loaded, or — if the files no longer load (checked at
/// reload, but they may have changed since) — what was in use before.
fn renewed<T>(loaded: Option<Result<T, String>>, before: Option<T>, what: &str) -> Option<T> {
    match loaded? {
        Ok(new) => Some(new),
        Err(e) => {
            tracing::error!(error = %e, "cannot load the new {what}; keeping the ones in use");
            before
        }
    }
}

/// One of the listener's sessions, counted while it lives. A counter
/// rather than a semaphore: the limit may change on a reload.
struct Permit(Arc<AtomicUsize>);

impl Permit {
    /// A slot if fewer than `max` sessions are open.
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Permit> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Permit(open.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A session slot, or why there is none (true: the listener drains).
type Slot = Result<(Permit, Option<ClientSlot>), Refusal>;

/// Why a client is turned away at once.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// The listener drains.
    Draining(Away),
    /// The server has `max_connections` sessions.
    Busy,
    /// Its address has too many.
    Client(TooMany),
}

/// A session slot for a client from `peer`, or why there is none. Clients
/// in `relay_networks` are trusted with any number of sessions.
fn admit(
    cfg: &SmtpConfig,
    open: &Arc<AtomicUsize>,
    clients: &Arc<Clients>,
    peer: SocketAddr,
    draining: Option<Away>,
) -> Slot {
    if let Some(away) = draining {
        return Err(Refusal::Draining(away));
    }
    let permit = Permit::take(open, cfg.max_connections).ok_or(Refusal::Busy)?;
    let ip = peer.ip().to_canonical();
    if cfg.trusts(ip) {
        return Ok((permit, None));
    }
    let client = clients
        .admit(ip, &cfg.limits, tokio::time::Instant::now())
        .map_err(Refusal::Client)?;
    Ok((permit, Some(client)))
}

/// How a connection uses TLS.
enum Tls {
    /// STARTTLS with this acceptor, if any.
    Offer(Option<TlsAcceptor>),
    /// TLS from the first byte.
    Implicit(TlsAcceptor),
}

// A connection task takes everything it serves with; a struct would only
// move this list elsewhere.
#[allow(clippy::too_many_arguments)]
async fn connection(
    mut stream: TcpStream,
    (peer, member): (SocketAddr, bool),
    permit: Slot,
    cfg: Arc<SmtpConfig>,
    tls: Tls,
    creds: Option<Arc<Credentials>>,
    accept: Arc<dyn Accept>,
    memory: Arc<BodyMemory>,
    (cancel, stopping): (CancellationToken, CancellationToken),
) {
    // Replies are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let (_permit, client) = match (permit, &tls) {
        (Ok(p), _) => p,
        // A TLS client would not read a plaintext 421: just close.
        (Err(_), Tls::Implicit(_)) => return,
        (Err(why), _) => return refuse(stream, peer, &cfg, why).await,
    };
    let listener = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    crate::events::connected(peer, &listener);
    // The debug trace of sessions (tests see a reload change the level by it).
    tracing::debug!(%peer, "smtp connect");
    let started = tokio::time::Instant::now();
    let tally = crate::events::SessionTally::default();
    crate::metrics::smtp_session(1);
    let t = Times {
        idle: cfg.idle_timeout,
        // However busy, a session ends by then (a slow trickle of valid
        // commands would otherwise hold a slot for ever).
        end: tokio::time::Instant::now() + cfg.limits.max_session_time,
    };
    let mut session = Session::new(cfg, peer.ip());
    session.with_memory(memory);
    if let Some(c) = client {
        session.with_budget(Arc::new(c));
    }
    if creds.is_none() {
        session.without_auth();
    }
    if member {
        session.for_cluster_member();
    }
    let with = Serving {
        accept: accept.as_ref(),
        creds: &creds,
        cancel: &cancel,
        stopping: &stopping,
        tally: &tally,
        t,
    };
    let ended = |result: &io::Result<()>| {
        let why = match result {
            Ok(()) => "quit or closed".to_string(),
            Err(e) => e.to_string(),
        };
        let ms = started.elapsed().as_millis() as u64;
        crate::events::disconnected(peer, &tally, ms, &why);
    };
    let tls = match tls {
        Tls::Offer(a) => a,
        Tls::Implicit(acceptor) => {
            let result = implicit(stream, peer, &mut session, acceptor, &with).await;
            crate::metrics::smtp_session(-1);
            ended(&result);
            return;
        }
    };
    if tls.is_none() {
        session.without_tls();
    }
    let result = async {
        write(&mut stream, session.greeting().as_bytes(), t.idle).await?;
        let end = drive(&mut stream, &mut session, &with).await?;
        match (end, tls) {
            (End::StartTls, Some(acceptor)) => {
                let handshake = tokio::select! {
                    h = tokio::time::timeout(t.idle, acceptor.accept(stream)) => h,
                    _ = cancel.cancelled() => return Ok(()),
                };
                let mut stream = handshake
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake"))??;
                session.tls_started();
                tracing::debug!(%peer, "smtp tls started");
                drive(&mut stream, &mut session, &with).await?;
                Ok(())
            }
            _ => Ok::<(), io::Error>(()),
        }
    }
    .await;
    crate::metrics::smtp_session(-1);
    ended(&result);
}

/// A session on an implicit-TLS port: handshake, then SMTP inside.
async fn implicit(
    stream: TcpStream,
    peer: SocketAddr,
    session: &mut Session,
    acceptor: TlsAcceptor,
    with: &Serving<'_>,
) -> io::Result<()> {
    let handshake = tokio::select! {
        h = tokio::time::timeout(with.t.idle, acceptor.accept(stream)) => h,
        _ = with.cancel.cancelled() => return Ok(()),
    };
    let mut stream =
        handshake.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake"))??;
    session.tls_started();
    tracing::debug!(%peer, "smtp tls started (implicit)");
    write(&mut stream, session.greeting().as_bytes(), with.t.idle).await?;
    drive(&mut stream, session, with).await?;
    Ok(())
}

/// What a session's driver works with.
struct Serving<'a> {
    accept: &'a dyn Accept,
    creds: &'a Option<Arc<Credentials>>,
    cancel: &'a CancellationToken,
    /// Cancelled when the node stops: a session between transactions
    /// gets 421 at once; one under way finishes its transaction first.
    stopping: &'a CancellationToken,
    /// What the session did, for its `disconnected` event.
    tally: &'a crate::events::SessionTally,
    t: Times,
}

/// The 421 for a new client while the listener drains.
fn away_reply(host: &str, away: Away) -> String {
    match away {
        Away::Moving => {
            format!("421 4.3.2 {host} Service moving to another node, try again shortly\r\n")
        }
        Away::Resting => {
            format!("421 4.3.2 {host} This node takes no new mail now, try again later\r\n")
        }
    }
}

/// Check credentials off the runtime's threads (argon2 is slow and
/// memory-hungry on purpose), at most one per core at a time: more wait
/// for nothing — they are told to try again.
async fn check(creds: &Option<Arc<Credentials>>, user: &str, password: String) -> Verdict {
    static SLOTS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    let slots = SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(tokio::sync::Semaphore::new(cores))
    });
    let Some(c) = creds.clone() else {
        return Verdict::Invalid;
    };
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        return Verdict::Busy;
    };
    let user = user.to_string();
    let ok = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        c.verify(&user, &password)
    })
    .await
    .unwrap_or(false);
    if ok {
        Verdict::Valid
    } else {
        Verdict::Invalid
    }
}

/// A session's time limits.
#[derive(Debug, Clone, Copy)]
struct Times {
    /// Longest silence from the client.
    idle: Duration,
    /// When the session ends, however busy.
    end: tokio::time::Instant,
}

/// Turn a client away with 421: too many connections, or moving.
async fn refuse(mut stream: TcpStream, peer: SocketAddr, cfg: &SmtpConfig, why: Refusal) {
    let host = &cfg.hostname;
    let reason = match why {
        Refusal::Draining(_) => "draining",
        Refusal::Busy => "busy",
        Refusal::Client(TooMany::Open) => "too_many_from_address",
        Refusal::Client(TooMany::Rate) => "too_fast_from_address",
    };
    let reply = match why {
        Refusal::Draining(away) => away_reply(host, away),
        Refusal::Busy => format!("421 4.3.2 {host} Too many connections, try again later\r\n"),
        Refusal::Client(TooMany::Open) => {
            format!("421 4.7.0 {host} Too many connections from your address\r\n")
        }
        Refusal::Client(TooMany::Rate) => {
            format!("421 4.7.0 {host} Too many connections from your address this minute\r\n")
        }
    };
    crate::events::refused(peer, reason, &reply);
    if write(&mut stream, reply.as_bytes(), cfg.idle_timeout)
        .await
        .is_ok()
    {
        linger_close(&mut stream).await;
    }
}

/// How a stretch of a session over one stream ended.
enum End {
    /// QUIT, 421, or the client closing.
    Closed,
    /// STARTTLS was accepted: the handshake comes next.
    StartTls,
}

/// Run `session` over `stream` until it ends or asks for TLS. Err is a
/// broken or unresponsive connection.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut Session,
    with: &Serving<'_>,
) -> io::Result<End> {
    let Serving {
        accept,
        creds,
        cancel,
        stopping,
        tally,
        t,
    } = *with;
    let idle = t.idle;
    let mut rbuf = vec![0u8; READ_BUF];
    let mut out = Vec::new();
    let mut replies = Vec::new();
    loop {
        tokio::select! {
            // Shutdown wins over pending input; a store in progress is never
            // interrupted because it is awaited outside this select.
            biased;
            _ = cancel.cancelled() => session.shutdown(&mut out),
            _ = stopping.cancelled(), if session.is_idle() => session.shutdown(&mut out),
            _ = tokio::time::sleep_until(t.end) => session.timeout(&mut out),
            read = tokio::time::timeout(idle, stream.read(&mut rbuf)) => match read {
                Err(_elapsed) => session.timeout(&mut out),
                Ok(Ok(0)) => return Ok(End::Closed),
                Ok(Ok(n)) => session.feed(&rbuf[..n], &mut out),
                Ok(Err(e)) => return Err(e),
            },
        }
        // A Deliver is always the last output of a round; storing it and
        // reporting the result may release pipelined input and yield more.
        let mut starttls = false;
        while !out.is_empty() {
            let (mut message, mut verify) = (None, None);
            for output in out.drain(..) {
                match output {
                    Output::Reply(r) => {
                        crate::metrics::smtp_reply(&r);
                        if r.starts_with('4') || r.starts_with('5') {
                            tally.rejected.fetch_add(1, Ordering::Relaxed);
                        }
                        replies.extend_from_slice(r.as_bytes())
                    }
                    Output::Deliver(m) => message = Some(m),
                    Output::Verify { user, password } => verify = Some((user, password)),
                    Output::StartTls => starttls = true,
                    Output::Close => {}
                }
            }
            if let Some(message) = message {
                let result = accept.accept(message).await;
                if result.is_ok() {
                    tally.messages.fetch_add(1, Ordering::Relaxed);
                }
                session.stored(result, &mut out);
            }
            if let Some((user, password)) = verify {
                let verdict = check(creds, &user, password).await;
                session.verified(&user, verdict, &mut out);
            }
        }
        if !replies.is_empty() {
            write(stream, &replies, idle).await?;
            replies.clear();
            // A burst of pipelined commands must not keep its buffer.
            if replies.capacity() > READ_BUF {
                replies = Vec::new();
            }
        }
        if starttls {
            return Ok(End::StartTls);
        }
        if session.is_closed() {
            linger_close(stream).await;
            return Ok(End::Closed);
        }
    }
}

/// Write all of `bytes`, giving up on a client that stops reading.
async fn write<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    limit: Duration,
) -> io::Result<()> {
    match tokio::time::timeout(limit, stream.write_all(bytes)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client is not reading",
        )),
    }
}

/// Send FIN, then read and discard what the client still sends for a short
/// while: closing with unread input would make the kernel send RST, which
/// can destroy our last reply before the client reads it.
async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
