//! The accept side of cluster links: authenticates each connection in its
//! own task and answers the calls that arrive on it.
//!
//! Calls on one link are handled concurrently, so a slow call (a join, a
//! snapshot) never holds up raft heartbeats behind it; their replies go out
//! through a single writer task in whatever order they finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use super::messages::{Envelope, Reply, Request};
use crate::cluster::identity::Identity;
use crate::cluster::link::transport::{Listener, Stream};
use crate::cluster::link::{self, LinkConfig, LinkReader, LinkWriter};

/// Answers the calls that arrive on accepted links.
pub trait Handler: Send + Sync + 'static {
    /// Answers one call from the authenticated peer `from`.
    fn handle(&self, from: Identity, req: Request) -> BoxFuture<'static, Reply>;
}

/// Calls one link may have in progress before we stop reading from it, so
/// a flooding peer gets backpressure instead of unbounded tasks.
const MAX_CALLS_PER_LINK: usize = 64;
/// Connections still in their handshake at once; more are closed at once.
/// A member's handshake takes well under a millisecond, so only a flood
/// of connections that never authenticate fills this — and then it costs
/// this many tasks and sockets, not all the node's descriptors (the SMTP
/// side needs them). Members turned away retry with backoff.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Pause after a failed accept (e.g. out of file descriptors): long enough
/// not to spin, short enough to recover quickly.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts cluster links on `listener` until `cancel` fires, then closes
/// every link it accepted and returns once their tasks are done.
pub async fn serve<L: Listener>(
    listener: L,
    cfg: LinkConfig,
    handler: Arc<dyn Handler>,
    cancel: CancellationToken,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    serve_capped(listener, cfg, handler, cancel, pending).await
}

/// [`serve`] with a handshake slot from `pending` for each connection.
pub(crate) async fn serve_capped<L: Listener>(
    mut listener: L,
    cfg: LinkConfig,
    handler: Arc<dyn Handler>,
    cancel: CancellationToken,
    pending: Arc<Semaphore>,
) {
    let tasks = TaskTracker::new();
    let cfg = Arc::new(cfg);
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, from)) => {
                let Ok(slot) = pending.clone().try_acquire_owned() else {
                    crate::metrics::cluster_link_refused("busy");
                    // Closed unanswered; said at most once a minute.
                    let now = tokio::time::Instant::now();
                    if warned.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60)) {
                        warned = Some(now);
                        tracing::warn!(%from, "too many cluster connections waiting for a handshake; closing new ones");
                    }
                    continue;
                };
                let (cfg, handler, cancel) = (cfg.clone(), handler.clone(), cancel.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = connection(stream, from, &cfg, handler, slot) => {}
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster accept failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// One accepted connection: handshake, then calls until the link ends.
async fn connection(
    stream: Stream,
    from: SocketAddr,
    cfg: &LinkConfig,
    handler: Arc<dyn Handler>,
    slot: OwnedSemaphorePermit,
) {
    // link::accept bounds the handshake by its deadline and logs failures.
    let accepted = link::accept(stream, from, cfg).await;
    drop(slot);
    let Ok(link) = accepted else {
        return;
    };
    let peer = link.peer;
    let (tx, rx) = mpsc::channel(MAX_CALLS_PER_LINK);
    // Dropping the set (when the link ends) aborts calls still running:
    // nobody could receive their replies.
    let mut calls = JoinSet::new();
    let limit = Arc::new(Semaphore::new(MAX_CALLS_PER_LINK));
    // Aborted with the connection (e.g. on shutdown) so the socket closes.
    let mut writer = AbortOnDropHandle::new(tokio::spawn(write_replies(link.writer, rx)));
    let mut reader = link.reader;
    loop {
        let call = tokio::select! {
            _ = &mut writer => break,
            Some(_) = calls.join_next() => continue,
            c = next_call(&mut reader) => c,
        };
        let Some((id, request)) = call else { break };
        let permit = tokio::select! {
            _ = &mut writer => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (handler, peer, tx) = (handler.clone(), peer.clone(), tx.clone());
        calls.spawn(async move {
            let reply = match request {
                Ok(req) => handler.handle(peer, req).await,
                Err(why) => Reply::Unavailable(why),
            };
            let _ = tx.send(Envelope::Reply { id, reply }).await;
            drop(permit);
        });
    }
}

/// The next call on the link, or None when the link ended or the peer broke
/// the protocol. A call whose request we cannot decode (a newer peer) still
/// gets an answer, as `Err(reason)`.
async fn next_call(reader: &mut LinkReader) -> Option<(u64, Result<Request, String>)> {
    let value = match reader.recv().await {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(error = %e, "cluster link ended");
            return None;
        }
    };
    match serde_json::from_value::<Envelope>(value.clone()) {
        Ok(Envelope::Call { id, request }) => Some((id, Ok(request))),
        Ok(Envelope::Reply { id, .. }) => {
            tracing::warn!(id, "peer sent a reply on a server link; closing it");
            None
        }
        Err(e) => match value.pointer("/Call/id").and_then(|v| v.as_u64()) {
            Some(id) => Some((id, Err(format!("unsupported request: {e}")))),
            None => {
                tracing::warn!(error = %e, "undecodable cluster message; closing link");
                None
            }
        },
    }
}

async fn write_replies(mut writer: LinkWriter, mut rx: mpsc::Receiver<Envelope>) {
    while let Some(env) = rx.recv().await {
        let body = match serde_json::to_value(&env) {
            Ok(b) => b,
            Err(e) => {
                // Still answer, so the caller does not wait for its timeout.
                let Envelope::Reply { id, .. } = env else {
                    continue;
                };
                let reply = Reply::Unavailable(format!("cannot encode reply: {e}"));
                match serde_json::to_value(Envelope::Reply { id, reply }) {
                    Ok(b) => b,
                    Err(_) => continue,
                }
            }
        };
        if let Err(e) = writer.send(body).await {
            tracing::debug!(error = %e, "cluster link write failed");
            return;
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
