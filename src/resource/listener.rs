//! The SMTP listener on a group's VIP: bound with IP_FREEBIND and the
//! configured backlog, serving the node's intake. A drain turns new
//! clients away with 421 and lets open sessions finish for the drain time;
//! a stop closes the listening socket and tells open sessions 421 at once,
//! without waiting for them. Its health check connects and expects a
//! greeting.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{OpFuture, Resource};
use crate::config::SmtpConfig;
use crate::smtp::clients::Clients;
use crate::smtp::{server, Accept};
use tokio::sync::watch;

/// An SMTP listener as a resource.
#[derive(Clone)]
pub struct SmtpListener {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    cfg: watch::Receiver<Arc<SmtpConfig>>,
    clients: Arc<Clients>,
    intake: Arc<dyn Accept>,
    drain: Duration,
    running: Mutex<Option<Running>>,
    /// Cancelled to cut a drain short (the lease got short).
    hurry: Mutex<CancellationToken>,
}

struct Running {
    drain: watch::Sender<bool>,
    cancel: CancellationToken,
    sessions: TaskTracker,
    accept: JoinHandle<()>,
}

impl SmtpListener {
    /// A listener on `addr` handing messages to `intake`; a graceful stop
    /// waits up to `drain` for open sessions.
    pub fn new(
        addr: SocketAddr,
        (cfg, clients): (watch::Receiver<Arc<SmtpConfig>>, Arc<Clients>),
        intake: Arc<dyn Accept>,
        drain: Duration,
    ) -> SmtpListener {
        SmtpListener {
            inner: Arc::new(Inner {
                addr,
                cfg,
                clients,
                intake,
                drain,
                running: Mutex::new(None),
                hurry: Mutex::new(CancellationToken::new()),
            }),
        }
    }
}

impl Inner {
    fn running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Resource for SmtpListener {
    fn name(&self) -> String {
        format!("smtp {}", self.inner.addr)
    }

    fn start(&self) -> OpFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            if inner.running().is_some() {
                return Ok(());
            }
            *inner.hurry.lock().unwrap_or_else(|e| e.into_inner()) = CancellationToken::new();
            let backlog = inner.cfg.borrow().backlog;
            let listener = server::bind(inner.addr, backlog)
                .map_err(|e| format!("cannot listen on {}: {e}", inner.addr))?;
            let (drain, cancel, sessions) = (
                watch::Sender::new(false),
                CancellationToken::new(),
                TaskTracker::new(),
            );
            let serving = server::Listener {
                cfg: inner.cfg.clone(),
                accept: inner.intake.clone(),
                drain: drain.subscribe(),
                away: server::Away::Moving,
                cancel: cancel.clone(),
                // Its sessions end with the group's drain, not the node's
                // stop.
                stopping: CancellationToken::new(),
                tracker: sessions.clone(),
                implicit_tls: false,
                clients: inner.clients.clone(),
            };
            let accept = tokio::spawn(server::serve_listener(listener, serving));
            tracing::info!(address = %inner.addr, "smtp listening on the group's VIP");
            *inner.running() = Some(Running {
                drain,
                cancel,
                sessions,
                accept,
            });
            Ok(())
        })
    }

    fn drain(&self) -> OpFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let sessions = {
                let running = inner.running();
                let Some(r) = running.as_ref() else {
                    return Ok(());
                };
                r.drain.send_replace(true);
                r.sessions.close();
                r.sessions.clone()
            };
            let hurry = inner
                .hurry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            tokio::select! {
                _ = tokio::time::timeout(inner.drain, sessions.wait()) => {}
                _ = hurry.cancelled() => {}
            }
            Ok(())
        })
    }

    fn stop(&self) -> OpFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let Some(r) = inner.running().take() else {
                return Ok(());
            };
            // Sessions still open are told 421 and closed by their own
            // tasks, within their own bounds; the stop does not wait for
            // them: by now the address is gone, so nothing they do can
            // reach a client on the VIP any more.
            r.cancel.cancel();
            let _ = r.accept.await;
            tracing::info!(address = %inner.addr, "smtp on the group's VIP stopped");
            Ok(())
        })
    }

    fn hurry(&self) {
        self.inner
            .hurry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cancel();
    }

    fn check(&self) -> OpFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let ended = inner.running().as_ref().map(|r| r.accept.is_finished());
            match ended {
                None => return Err("not listening".into()),
                Some(true) => return Err("the accept loop ended".into()),
                Some(false) => {}
            }
            greeting(inner.addr).await
        })
    }
}

/// Connect and read the greeting: 220, or 421 when every session slot is
/// taken (the listener works; restarting it would not help).
async fn greeting(addr: SocketAddr) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)
        .await
        .map_err(|e| format!("no greeting from {addr}: {e}"))?;
    if !(line.starts_with("220") || line.starts_with("421")) {
        return Err(format!(
            "unexpected greeting from {addr}: {}",
            line.trim_end()
        ));
    }
    let _ = r.get_mut().write_all(b"QUIT\r\n").await;
    Ok(())
}

#[cfg(test)]
#[path = "listener_tests.rs"]
mod tests;
