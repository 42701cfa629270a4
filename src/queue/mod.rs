//! The queue: tracks every durable message until all its recipients are
//! done, hands jobs to routes, retries on the retry ladder, expires old
//! mail and bounces failures. `core` decides; this driver does the I/O.

pub mod core;
pub mod ops;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::core::Stats;
use self::core::{now_ms, Action, Core, Failure};
use self::ops::{DestinationRow, Filter, MessageDetail, Op, Page, Selector};
use crate::config::{Config, Route};
use crate::delivery::{Job, JobResult};
use crate::events;
use crate::spool::{Envelope, IdGen, QueueId, RcptState, Recipient, Spool};

/// Where the queue sends jobs: one call per job, never blocking.
pub trait Dispatch: Send + Sync + 'static {
    /// Deliver `job` by `target`, route number `route` of the
    /// configuration it was routed under; its result comes back on the
    /// queue's result channel.
    fn dispatch(&self, route: usize, target: Arc<Route>, job: Job);
}

/// Hands durable messages to the queue, and operators' requests.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<Envelope>,
    ops: mpsc::UnboundedSender<Request>,
}

/// An operator's request, answered by the driver between two events.
enum Request {
    List(Filter, Option<QueueId>, usize, oneshot::Sender<Page>),
    Show(QueueId, oneshot::Sender<Option<MessageDetail>>),
    Summary(oneshot::Sender<Vec<DestinationRow>>),
    Act(Op, Selector, oneshot::Sender<Result<usize, String>>),
}

impl QueueHandle {
    /// Queue a message that is already durable in the spool.
    pub fn admit(&self, envelope: Envelope) {
        // Fails only after shutdown; the message is safe in the spool.
        let _ = self.tx.send(envelope);
    }

    async fn ask<T>(&self, req: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.ops.send(req(tx)).ok()?;
        rx.await.ok()
    }

    /// A page of messages matching `f` after `after`, oldest first. None
    /// once the queue has stopped.
    pub async fn list(&self, f: Filter, after: Option<QueueId>, limit: usize) -> Option<Page> {
        self.ask(|tx| Request::List(f, after, limit, tx)).await
    }

    /// One message, without headers (Some(None): not queued).
    pub async fn show(&self, id: QueueId) -> Option<Option<MessageDetail>> {
        self.ask(|tx| Request::Show(id, tx)).await
    }

    /// Per destination counts.
    pub async fn summary(&self) -> Option<Vec<DestinationRow>> {
        self.ask(Request::Summary).await
    }

    /// Do `op` to the messages `sel` names; how many it changed, or why
    /// it did nothing. A hold or release answers once it is durable.
    pub async fn act(&self, op: Op, sel: Selector) -> Option<Result<usize, String>> {
        self.ask(|tx| Request::Act(op, sel, tx)).await
    }
}

/// Everything the queue driver needs.
pub struct QueueParts {
    /// The configuration, as reloads change it.
    pub config: tokio::sync::watch::Receiver<Arc<Config>>,
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
    /// Where the ids of held messages are kept across restarts (None:
    /// holds last until the node stops).
    pub held_file: Option<PathBuf>,
}

/// Start the queue driver; messages recovered from the spool are queued
/// at once.
pub fn spawn(parts: QueueParts) -> QueueHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ops, ops_rx) = mpsc::unbounded_channel();
    let handle = QueueHandle { tx, ops };
    let held = HeldFile::new(parts.held_file.clone());
    let was_held = held.load();
    let mut core = Core::new();
    let mut out = Vec::new();
    let cfg = parts.config.borrow().clone();
    for r in parts.spool.recovered() {
        let hold = was_held.contains(&r.envelope.id);
        core.admit(&cfg, r.envelope, hold, Instant::now(), now_ms(), &mut out);
    }
    let driver = Driver {
        core,
        parts,
        handle: handle.clone(),
        held,
    };
    let tracker = driver.parts.tracker.clone();
    tracker.spawn(driver.run(rx, ops_rx, out));
    handle
}

/// The ids of held messages, one per line in hex, rewritten whole (and
/// synced) after each hold or release; writes are ordered by version, so
/// a slow older one never overwrites a newer.
#[derive(Clone)]
struct HeldFile {
    path: Option<PathBuf>,
    written: Arc<tokio::sync::Mutex<u64>>,
    version: Arc<std::sync::atomic::AtomicU64>,
}

impl HeldFile {
    fn new(path: Option<PathBuf>) -> HeldFile {
        HeldFile {
            path,
            written: Arc::default(),
            version: Arc::default(),
        }
    }

    fn load(&self) -> HashSet<QueueId> {
        let Some(path) = &self.path else {
            return HashSet::new();
        };
        match std::fs::read_to_string(path) {
            Ok(text) => text.lines().filter_map(ops::parse_id).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the held messages: none is held");
                HashSet::new()
            }
        }
    }

    /// A version for the held set as it is now: take it together with
    /// the set, so writes land in the order the sets were taken.
    fn next_version(&self) -> u64 {
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    /// Write `ids`, the held set as of `version`, unless a later one was
    /// written already.
    async fn write(&self, ids: Vec<QueueId>, version: u64) -> std::io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let mut written = self.written.lock().await;
        if *written > version {
            return Ok(());
        }
        let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
        tokio::task::spawn_blocking(move || {
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(std::io::Error::other)??;
        *written = version;
        Ok(())
    }
}

struct Driver {
    core: Core,
    parts: QueueParts,
    handle: QueueHandle,
    held: HeldFile,
}

impl Driver {
    async fn run(
        mut self,
        mut new: mpsc::UnboundedReceiver<Envelope>,
        mut ops: mpsc::UnboundedReceiver<Request>,
        mut out: Vec<Action>,
    ) {
        loop {
            self.carry_out(&mut out);
            let due = self.core.next_due();
            // The configuration as it is when the event comes, not as it
            // was when the wait began: a reload may have come between.
            let cfg = || self.parts.config.borrow().clone();
            tokio::select! {
                _ = self.parts.cancel.cancelled() => break,
                Some(env) = new.recv() => {
                    self.core.admit(&cfg(), env, false, Instant::now(), now_ms(), &mut out);
                }
                Some(req) = ops.recv() => self.answer(&cfg(), req, &mut out),
                Some(r) = self.parts.results.recv() => {
                    self.core.result(&cfg(), r, Instant::now(), now_ms(), &mut out);
                }
                _ = sleep_until(due) => {
                    self.core.due(&cfg(), Instant::now(), now_ms(), &mut out);
                }
            }
        }
    }

    fn answer(&mut self, cfg: &Config, req: Request, out: &mut Vec<Action>) {
        match req {
            Request::List(f, after, limit, tx) => {
                let _ = tx.send(self.core.list(cfg, &f, after, limit));
            }
            Request::Show(id, tx) => {
                let _ = tx.send(self.core.show(cfg, id));
            }
            Request::Summary(tx) => {
                let _ = tx.send(self.core.summary(cfg));
            }
            Request::Act(op, sel, tx) => {
                let ids = match self.core.select(cfg, &sel) {
                    Ok(ids) => ids,
                    Err(why) => {
                        let _ = tx.send(Err(why));
                        return;
                    }
                };
                let n = self.core.act(cfg, op, &ids, Instant::now(), now_ms(), out);
                if !matches!(op, Op::Hold | Op::Release) || n == 0 {
                    let _ = tx.send(Ok(n));
                    return;
                }
                // Answered once durable: a hold must outlive a restart.
                let (held, ids) = (self.held.clone(), self.core.held());
                let version = held.next_version();
                self.parts.tracker.spawn(async move {
                    let r = held.write(ids, version).await;
                    let _ = tx.send(r.map(|()| n).map_err(|e| {
                        format!("done, but not recorded on disk (a restart forgets it): {e}")
                    }));
                });
            }
        }
    }

    /// Publish the counts and carry out what the core decided.
    fn carry_out(&mut self, out: &mut Vec<Action>) {
        let cfg = self.parts.config.borrow().clone();
        let stats = self.core.stats();
        self.parts
            .stats
            .send_if_modified(|s| std::mem::replace(s, stats) != stats);
        for action in out.drain(..) {
            match action {
                Action::Dispatch { route, target, job } => {
                    self.parts.dispatch.dispatch(route, target, job)
                }
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
                events::received(dsn_id, "", rcpt, "local", "", "DSN");
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
