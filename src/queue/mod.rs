//! The queue: tracks every durable message until all its recipients are
//! done, hands jobs to routes, retries on the retry ladder, expires old
//! mail and bounces failures. `core` decides; this driver does the I/O.

pub mod core;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::core::Stats;
use self::core::{now_ms, Action, Core, Failure};
use crate::config::Config;
use crate::delivery::{Job, JobResult};
use crate::events;
use crate::spool::{Envelope, IdGen, RcptState, Recipient, Spool};

/// Where the queue sends jobs: one call per job, never blocking.
pub trait Dispatch: Send + Sync + 'static {
    /// Deliver `job` by route `route`; its result comes back on the
    /// queue's result channel.
    fn dispatch(&self, route: usize, job: Job);
}

/// Hands durable messages to the queue.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<Envelope>,
}

impl QueueHandle {
    /// Queue a message that is already durable in the spool.
    pub fn admit(&self, envelope: Envelope) {
        // Fails only after shutdown; the message is safe in the spool.
        let _ = self.tx.send(envelope);
    }
}

/// Everything the queue driver needs.
pub struct QueueParts {
    /// The configuration.
    pub config: Arc<Config>,
    /// The spool messages live in.
    pub spool: Arc<dyn Spool>,
    /// Where jobs go.
    pub dispatch: Arc<dyn Dispatch>,
    /// Where job results come from.
    pub results: mpsc::UnboundedReceiver<JobResult>,
    /// Queue ids for DSNs.
    pub ids: Arc<IdGen>,
    /// Stops the driver.
    pub cancel: CancellationToken,
    /// Tracks the driver's tasks.
    pub tracker: TaskTracker,
    /// Where the driver publishes its counts.
    pub stats: tokio::sync::watch::Sender<Stats>,
}

/// Start the queue driver; messages recovered from the spool are queued
/// at once.
pub fn spawn(parts: QueueParts) -> QueueHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = QueueHandle { tx };
    for r in parts.spool.recovered() {
        handle.admit(r.envelope);
    }
    let driver = Driver {
        core: Core::new(),
        parts,
        handle: handle.clone(),
    };
    let tracker = driver.parts.tracker.clone();
    tracker.spawn(driver.run(rx));
    handle
}

struct Driver {
    core: Core,
    parts: QueueParts,
    handle: QueueHandle,
}

impl Driver {
    async fn run(mut self, mut new: mpsc::UnboundedReceiver<Envelope>) {
        let mut out = Vec::new();
        loop {
            let due = self.core.next_due();
            let cfg = self.parts.config.clone();
            tokio::select! {
                _ = self.parts.cancel.cancelled() => break,
                Some(env) = new.recv() => {
                    self.core.admit(&cfg, env, Instant::now(), now_ms(), &mut out);
                }
                Some(r) = self.parts.results.recv() => {
                    self.core.result(&cfg, r, Instant::now(), now_ms(), &mut out);
                }
                _ = sleep_until(due) => {
                    self.core.due(&cfg, Instant::now(), now_ms(), &mut out);
                }
            }
            let stats = self.core.stats();
            self.parts
                .stats
                .send_if_modified(|s| std::mem::replace(s, stats) != stats);
            for action in out.drain(..) {
                match action {
                    Action::Dispatch { route, job } => self.parts.dispatch.dispatch(route, job),
                    Action::Settle {
                        envelope,
                        changes,
                        bounce,
                        finished,
                    } => {
                        let spool = self.parts.spool.clone();
                        let ids = self.parts.ids.clone();
                        let queue = self.handle.clone();
                        let host = cfg.smtp.hostname.clone();
                        self.parts.tracker.spawn(async move {
                            let s = Settle {
                                spool,
                                ids,
                                queue,
                                host,
                            };
                            s.run(envelope, changes, bounce, finished).await
                        });
                    }
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Makes one result durable: first the DSN (if any), then the new
/// recipient states, so a crash in between re-sends a bounce rather than
/// losing one.
struct Settle {
    spool: Arc<dyn Spool>,
    ids: Arc<IdGen>,
    queue: QueueHandle,
    host: String,
}

impl Settle {
    async fn run(
        self,
        original: Envelope,
        changes: Vec<(usize, RcptState)>,
        bounce: Vec<Failure>,
        finished: bool,
    ) {
        let id = original.id;
        if !bounce.is_empty() && !self.bounce(&original, &bounce).await {
            // The failures stay pending on disk and bounce again after a
            // restart; better twice than never.
            return;
        }
        let r = if finished {
            self.spool.remove(id).await
        } else {
            self.spool.update(id, changes).await
        };
        if let Err(e) = r {
            tracing::error!(queue_id = %id, error = %e, "could not record delivery results");
        }
    }

    /// Queue a DSN for `failures`; false if it could not be made durable.
    async fn bounce(&self, original: &Envelope, failures: &[Failure]) -> bool {
        let body = self.spool.body(original.id).await.unwrap_or_default();
        let dsn_id = self.ids.next();
        let date = jiff::fmt::rfc2822::to_string(&jiff::Zoned::now()).unwrap_or_default();
        let message_id = format!("{dsn_id}@{}", self.host);
        let Some(n) = crate::dsn::build(&self.host, original, &body, failures, &date, &message_id)
        else {
            return true;
        };
        let envelope = Envelope {
            id: dsn_id,
            sender: String::new(),
            recipients: vec![Recipient {
                address: n.recipient,
                state: RcptState::Pending { attempts: 0 },
            }],
            arrived_ms: now_ms(),
        };
        match self
            .spool
            .store(envelope.clone(), Bytes::from(n.body))
            .await
        {
            Ok(()) => {
                let rcpt = &envelope.recipients[0].address;
                events::received(dsn_id, "", rcpt, "local", "DSN");
                self.queue.admit(envelope);
                true
            }
            Err(e) => {
                tracing::error!(queue_id = %original.id, error = %e, "could not store DSN");
                false
            }
        }
    }
}
