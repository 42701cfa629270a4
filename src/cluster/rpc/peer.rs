//! A client for calls to one peer over one reusable, self-healing link.
//!
//! The link is opened on the first call and shared by all later calls
//! (replies are matched to calls by envelope id). Any failure — connect
//! refused, link error, a call timing out on a link that went silent —
//! drops the link for good and the next call opens a fresh one, so no
//! failure needs a restart to heal (DESIGN.md lesson 1). Failed connects back off
//! exponentially with jitter so a dead peer costs no hot loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::messages::{Envelope, Reply, Request};
use crate::cluster::identity::Identity;
use crate::cluster::link::{self, Link, LinkConfig, LinkError, LinkReader, LinkWriter};

/// First delay after a failed connect.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest delay between connect attempts to a dead peer.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Calls queued for the writer before callers wait; raft keeps only a
/// handful in flight per peer.
const SEND_QUEUE: usize = 64;

/// Why a call failed.
#[derive(Debug, Error)]
pub enum CallError {
    /// No link could be opened (refused, unreachable, handshake refused).
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The peer's address.
        addr: SocketAddr,
        /// What went wrong.
        source: LinkError,
    },
    /// Recent connects failed and the next attempt is not due before the
    /// call's deadline.
    #[error("{addr} unreachable, next attempt in {wait:?} (last error: {last})")]
    BackingOff {
        /// The peer's address.
        addr: SocketAddr,
        /// Time until the next attempt.
        wait: Duration,
        /// The error of the last attempt.
        last: String,
    },
    /// Someone else answers at the address (e.g. the node was re-created).
    #[error("{addr} is {} ({:016x}), expected incarnation {expected:016x}", got.name, got.incarnation)]
    WrongPeer {
        /// The peer's address.
        addr: SocketAddr,
        /// The incarnation we wanted.
        expected: u64,
        /// Who answered.
        got: Identity,
    },
    /// The link failed while the call was waiting for its reply.
    #[error("link to {addr} lost: {reason}")]
    LinkLost {
        /// The peer's address.
        addr: SocketAddr,
        /// Why the link ended.
        reason: String,
    },
    /// No reply within the call's timeout; the link was dropped.
    #[error("call to {addr} timed out after {timeout:?}")]
    TimedOut {
        /// The peer's address.
        addr: SocketAddr,
        /// The call's timeout.
        timeout: Duration,
    },
    /// The request could not be encoded (a bug; the link is unaffected).
    #[error("cannot encode request: {0}")]
    Encode(#[from] serde_json::Error),
}

impl CallError {
    /// True when the peer could not be reached at all, as opposed to a
    /// link that failed under a call: callers should back off.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            CallError::Connect { .. } | CallError::BackingOff { .. } | CallError::WrongPeer { .. }
        )
    }
}

/// One reusable client per member (by incarnation), made anew when the
/// member's address changes.
#[derive(Clone)]
pub struct PeerClients {
    link: LinkConfig,
    map: Arc<Mutex<HashMap<u64, (SocketAddr, PeerClient)>>>,
}

impl PeerClients {
    /// Clients whose links are made with `link`.
    pub fn new(link: LinkConfig) -> PeerClients {
        PeerClients {
            link,
            map: Arc::default(),
        }
    }

    /// The client for member `id` at `addr`.
    pub fn get(&self, id: u64, addr: SocketAddr) -> PeerClient {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&id) {
            Some((a, c)) if *a == addr => c.clone(),
            _ => {
                let c = PeerClient::new(addr, self.link.clone(), Some(id));
                map.insert(id, (addr, c.clone()));
                c
            }
        }
    }
}

/// A cheap-to-clone client for one peer address; clones share the link.
#[derive(Clone)]
pub struct PeerClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

struct Inner {
    addr: SocketAddr,
    cfg: LinkConfig,
    expect: Option<u64>,
    state: Mutex<State>,
    /// One connect at a time; concurrent callers wait and share its link.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    conn: Option<Arc<Conn>>,
    /// Consecutive connects that failed or gave a link that never answered.
    failures: u32,
    /// Links established so far.
    links: u64,
    next_attempt: Option<Instant>,
    last_error: String,
}

/// One open link: the writer task's queue and the calls waiting for replies.
struct Conn {
    shared: Arc<Shared>,
    tx: mpsc::Sender<serde_json::Value>,
    next_id: AtomicU64,
    /// Ends the link's tasks when the last user lets go of it.
    _guard: DropGuard,
}

struct Shared {
    pending: Mutex<Pending>,
    closed: CancellationToken,
}

struct Pending {
    /// False once the link failed: no new call may wait on it.
    open: bool,
    /// Replies received so far (a link that never answers counts as a
    /// failed connect for backoff; one that answers others is not wedged).
    replies: u64,
    reason: String,
    calls: HashMap<u64, oneshot::Sender<Reply>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the link: waiting calls see their reply channel close at once.
    fn kill(&self, reason: impl Into<String>) {
        let mut p = self.lock();
        if p.open {
            p.open = false;
            p.reason = reason.into();
            p.calls.clear();
        }
        drop(p);
        self.closed.cancel();
    }
}

impl PeerClient {
    /// A client for `addr`; `expect` is the peer's incarnation when known,
    /// so a different node at that address is refused.
    pub fn new(addr: SocketAddr, cfg: LinkConfig, expect: Option<u64>) -> PeerClient {
        PeerClient {
            inner: Arc::new(Inner {
                addr,
                cfg,
                expect,
                state: Mutex::new(State::default()),
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The peer's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Sends `request` and waits for its reply, connecting first if needed;
    /// the whole call, connect included, is bounded by `timeout`.
    pub async fn call(&self, request: Request, timeout: Duration) -> Result<Reply, CallError> {
        let deadline = Instant::now() + timeout;
        let addr = self.inner.addr;
        let timed_out = CallError::TimedOut { addr, timeout };
        let conn = self.conn(deadline, timeout).await?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::to_value(Envelope::Call { id, request })?;
        let (tx, rx) = oneshot::channel();
        let replies_before = {
            let mut p = conn.shared.lock();
            if !p.open {
                return Err(CallError::LinkLost {
                    addr,
                    reason: p.reason.clone(),
                });
            }
            p.calls.insert(id, tx);
            p.replies
        };
        // Forget the call if the caller gives up (openraft drops RPC
        // futures at its hard TTL): a late reply is then simply discarded.
        let _forget = Forget {
            shared: &conn.shared,
            id,
        };
        let waited = timeout_at(deadline, async {
            if conn.tx.send(body).await.is_err() {
                return None;
            }
            rx.await.ok()
        })
        .await;
        match waited {
            Ok(Some(reply)) => {
                self.state().failures = 0;
                Ok(reply)
            }
            Ok(None) => Err(CallError::LinkLost {
                addr,
                reason: conn.shared.lock().reason.clone(),
            }),
            Err(_) => {
                // Silence since the call went out may mean a half-open or
                // wedged connection that would swallow every later call
                // too, so the link goes. If other replies came meanwhile the
                // link works and only this call is slow (a long join): the
                // calls sharing the link are spared.
                if conn.shared.lock().replies == replies_before {
                    conn.shared.kill(format!("no reply within {timeout:?}"));
                    tracing::warn!(%addr, ?timeout, "cluster call timed out; dropping link");
                }
                Err(timed_out)
            }
        }
    }

    /// How many links this client has established (for metrics and tests).
    pub fn links_opened(&self) -> u64 {
        self.state().links
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open link, if it is still alive; a dead one is discarded here
    /// and charged to the backoff when it never answered anything.
    fn live(&self) -> Option<Arc<Conn>> {
        let mut st = self.state();
        let conn = st.conn.as_ref()?;
        let p = conn.shared.lock();
        if p.open {
            drop(p);
            return st.conn.clone();
        }
        let (answered, reason) = (p.replies > 0, p.reason.clone());
        drop(p);
        st.conn = None;
        if !answered {
            record_failure(&mut st, reason);
        }
        None
    }

    async fn conn(&self, deadline: Instant, timeout: Duration) -> Result<Arc<Conn>, CallError> {
        let addr = self.inner.addr;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let timed_out = || CallError::TimedOut { addr, timeout };
        let _gate = timeout_at(deadline, self.inner.connecting.lock())
            .await
            .map_err(|_| timed_out())?;
        // Whoever held the gate may have connected for us.
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let due = {
            let st = self.state();
            st.next_attempt.map(|at| (at, st.last_error.clone()))
        };
        if let Some((at, last)) = due {
            let now = Instant::now();
            if at > now {
                if at >= deadline {
                    return Err(CallError::BackingOff {
                        addr,
                        wait: at - now,
                        last,
                    });
                }
                sleep_until(at).await;
            }
        }
        let result = match timeout_at(deadline, link::connect(addr, &self.inner.cfg)).await {
            Err(_) => Err(timed_out()),
            Ok(Err(source)) => Err(CallError::Connect { addr, source }),
            Ok(Ok(link)) => match self.inner.expect {
                Some(expected) if link.peer.incarnation != expected => Err(CallError::WrongPeer {
                    addr,
                    expected,
                    got: link.peer,
                }),
                _ => Ok(link),
            },
        };
        let mut st = self.state();
        match result {
            Ok(link) => {
                st.next_attempt = None;
                st.links += 1;
                let conn = start(link);
                st.conn = Some(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                record_failure(&mut st, e.to_string());
                Err(e)
            }
        }
    }
}

/// Removes a call's entry when its caller stops waiting, however it stops.
struct Forget<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.shared.lock().calls.remove(&self.id);
    }
}

fn record_failure(st: &mut State, error: String) {
    st.failures = st.failures.saturating_add(1);
    st.next_attempt = Some(Instant::now() + backoff(st.failures));
    st.last_error = error;
}

/// The delay before attempt `failures + 1`: doubling from `BACKOFF_MIN` up
/// to `BACKOFF_MAX`, then jittered down by up to half so that nodes which
/// lost a peer together do not all retry in step.
pub fn backoff(failures: u32) -> Duration {
    let jitter = crate::backoff::jitter();
    crate::backoff::delay(BACKOFF_MIN, BACKOFF_MAX, failures.saturating_sub(1), jitter)
}

/// Starts the reader and writer tasks of a fresh link.
fn start(link: Link) -> Arc<Conn> {
    let closed = CancellationToken::new();
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending {
            open: true,
            replies: 0,
            reason: String::new(),
            calls: HashMap::new(),
        }),
        closed: closed.clone(),
    });
    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    tokio::spawn(read_replies(link.reader, shared.clone()));
    tokio::spawn(write_calls(link.writer, rx, shared.clone()));
    Arc::new(Conn {
        shared,
        tx,
        next_id: AtomicU64::new(1),
        _guard: closed.drop_guard(),
    })
}

async fn read_replies(mut reader: LinkReader, shared: Arc<Shared>) {
    loop {
        let msg = tokio::select! {
            _ = shared.closed.cancelled() => return,
            msg = reader.recv() => msg,
        };
        let value = match msg {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(error = %e, "cluster link lost");
                shared.kill(e.to_string());
                return;
            }
        };
        let (id, reply) = match serde_json::from_value::<Envelope>(value.clone()) {
            Ok(Envelope::Reply { id, reply }) => (id, reply),
            Ok(Envelope::Call { .. }) => {
                shared.kill("peer sent a call on our client link");
                return;
            }
            // A reply we cannot decode (a newer peer?) fails only its call.
            Err(e) => match value.pointer("/Reply/id").and_then(|v| v.as_u64()) {
                Some(id) => (id, Reply::Unavailable(format!("undecodable reply: {e}"))),
                None => {
                    shared.kill(format!("undecodable message: {e}"));
                    return;
                }
            },
        };
        let waiter = {
            let mut p = shared.lock();
            p.replies += 1;
            p.calls.remove(&id)
        };
        // No waiter: the caller gave up already.
        if let Some(w) = waiter {
            let _ = w.send(reply);
        }
    }
}

async fn write_calls(
    mut writer: LinkWriter,
    mut rx: mpsc::Receiver<serde_json::Value>,
    shared: Arc<Shared>,
) {
    loop {
        let body = tokio::select! {
            _ = shared.closed.cancelled() => return,
            body = rx.recv() => match body {
                Some(b) => b,
                None => return,
            },
        };
        // A peer that stops reading must not pin this task once the link
        // is killed, so the write races the close too.
        tokio::select! {
            _ = shared.closed.cancelled() => return,
            r = writer.send(body) => if let Err(e) = r {
                shared.kill(e.to_string());
                return;
            },
        }
    }
}

#[cfg(test)]
#[path = "peer_tests.rs"]
pub(crate) mod tests;
