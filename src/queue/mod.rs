//! The queue: tracks every durable message until all its recipients are
//! done, hands jobs to routes, retries on the retry ladder, expires old
//! mail and bounces failures. `core` decides; this driver does the I/O.
//!
//! May import: `delivery`, `dsn`, `spool`, `config`, `events` and `clock`.

pub mod core;
pub mod intake;
pub mod ops;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::core::Stats;
use self::core::{Action, Core};
use self::ops::{DestinationRow, Filter, MessageDetail, Op, Page, Selector};
use crate::clock::now_ms;
use crate::config::{Config, Route};
use crate::delivery::gate::Gate;
use crate::delivery::{Job, JobResult};
use crate::dsn::Failure;
use crate::events;
use crate::spool::{Envelope, IdGen, QueueId, RcptState, Recipient, Spool, SpoolError};

/// How often parked jobs look at a gate that is open but whose lease had
/// lapsed.
const UNPARK_POLL: Duration = Duration::from_millis(100);

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
    /// Jobs leave only while it is open; meanwhile they wait here, not
    /// counted as attempts.
    pub gate: Arc<Gate>,
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
        let hold = match &was_held {
            Held::These(ids) => ids.contains(&r.envelope.id),
            Held::Unknown => true,
        };
        core.admit(&cfg, r.envelope, hold, Instant::now(), now_ms(), &mut out);
    }
    let driver = Driver {
        core,
        parts,
        handle: handle.clone(),
        held,
        parked: Vec::new(),
    };
    let tracker = driver.parts.tracker.clone();
    tracker.spawn(driver.run(rx, ops_rx, out));
    handle
}

/// What the held file says at start.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    /// These messages are held.
    These(HashSet<QueueId>),
    /// It could not be read: any message may have been held, so every
    /// one is, until an operator releases them.
    Unknown,
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

    fn load(&self) -> Held {
        let Some(path) = &self.path else {
            return Held::These(HashSet::new());
        };
        let read = std::fs::read_to_string(path).map_err(|e| e.to_string());
        let ids = match read {
            Err(_) if !path.exists() => return Held::These(HashSet::new()),
            Ok(text) => text
                .lines()
                .map(|l| ops::parse_id(l).ok_or_else(|| format!("not a queue id: {l:?}")))
                .collect::<Result<HashSet<QueueId>, String>>(),
            Err(e) => Err(e),
        };
        ids.map(Held::These).unwrap_or_else(|e| {
            tracing::error!(
                path = %path.display(),
                error = %e,
                "cannot read which messages are held: holding every queued message; \
                 release them with `mtad ctl queue release`"
            );
            Held::Unknown
        })
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
    /// Jobs decided while the gate was shut: they leave when it opens.
    parked: Vec<(usize, Arc<Route>, Job)>,
}

impl Driver {
    async fn run(
        mut self,
        mut new: mpsc::UnboundedReceiver<Envelope>,
        mut ops: mpsc::UnboundedReceiver<Request>,
        mut out: Vec<Action>,
    ) {
        let mut gate = self.parts.gate.watch();
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
                Ok(()) = gate.changed() => {
                    gate.borrow_and_update();
                    self.unpark(&mut out);
                }
                // Open, but its lease had lapsed when they parked: a renewal
                // moves the lease's end without a word, so look again.
                _ = tokio::time::sleep(UNPARK_POLL), if !self.parked.is_empty() && *gate.borrow() => {
                    self.unpark(&mut out);
                }
            }
        }
    }

    /// Send the parked jobs on, if the gate is open now.
    fn unpark(&mut self, out: &mut Vec<Action>) {
        if self.parked.is_empty() || !self.parts.gate.is_open() {
            return;
        }
        tracing::info!(
            jobs = self.parked.len(),
            "delivery gate open: parked jobs leave"
        );
        for (route, target, job) in std::mem::take(&mut self.parked) {
            // Not what was deleted meanwhile (by an operator, or taken
            // over by another node while this one was fenced).
            if self.core.messages.contains_key(&job.id) {
                out.push(Action::Dispatch { route, target, job });
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
                Action::Dispatch { route, target, job } if self.parts.gate.is_open() => {
                    self.parts.dispatch.dispatch(route, target, job)
                }
                Action::Dispatch { route, target, job } => {
                    if self.parked.is_empty() {
                        tracing::info!(id = %job.id, "delivery gate shut: jobs wait for it");
                    }
                    self.parked.push((route, target, job));
                }
                Action::Settle {
                    envelope,
                    changes,
                    bounce,
                    finished,
                } => {
                    let s = Settle {
                        spool: self.parts.spool.clone(),
                        ids: self.parts.ids.clone(),
                        queue: self.handle.clone(),
                        host: cfg.smtp.hostname.clone(),
                        cancel: self.parts.cancel.clone(),
                    };
                    self.parts
                        .tracker
                        .spawn(s.run(envelope, changes, bounce, finished));
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
    /// The node stops: what is not durable yet is done again after the
    /// restart (the disk still says pending).
    cancel: CancellationToken,
}

/// Pauses between attempts to make a result durable: from the first, to
/// the longest.
const SETTLE_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

impl Settle {
    /// Make the result durable, trying again (backing off) until it is or
    /// the node stops: the queue already acts on it, and the disk must
    /// come to say the same — else a restart would send again what was
    /// delivered meanwhile, and a bounce would wait for that restart.
    async fn run(
        self,
        original: Envelope,
        changes: Vec<(usize, RcptState)>,
        bounce: Vec<Failure>,
        finished: bool,
    ) {
        let id = original.id;
        let mut dsn = match bounce.is_empty() {
            true => None,
            false => self.dsn(&original, &bounce).await,
        };
        let mut pause = SETTLE_RETRY.0;
        loop {
            let done = self.once(id, &mut dsn, &changes, finished).await;
            let Err(e) = done else { return };
            tracing::error!(queue_id = %id, error = %e, retry_in = ?pause, "could not record delivery results");
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(SETTLE_RETRY.1);
        }
    }

    /// One attempt: the DSN first (once stored, it is not stored again),
    /// then the recipients' states.
    async fn once(
        &self,
        id: QueueId,
        dsn: &mut Option<(Envelope, Bytes)>,
        changes: &[(usize, RcptState)],
        finished: bool,
    ) -> Result<(), SpoolError> {
        if let Some((envelope, body)) = dsn.clone() {
            self.spool.store(envelope.clone(), body).await?;
            *dsn = None;
            let rcpt = &envelope.recipients[0].address;
            events::received(envelope.id, "", rcpt, "local", "", "DSN");
            self.queue.admit(envelope);
        }
        let r = if finished {
            self.spool.remove(id).await
        } else {
            self.spool.update(id, changes.to_vec()).await
        };
        match r {
            // Removed meanwhile (a later result finished it, or an
            // operator deleted it): nothing left to record.
            Err(SpoolError::NotFound(_)) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The DSN for `failures`, if one goes out.
    async fn dsn(&self, original: &Envelope, failures: &[Failure]) -> Option<(Envelope, Bytes)> {
        let body = self.spool.body(original.id).await.unwrap_or_default();
        let dsn_id = self.ids.next();
        let date = jiff::fmt::rfc2822::to_string(&jiff::Zoned::now()).unwrap_or_default();
        let message_id = format!("{dsn_id}@{}", self.host);
        let n = crate::dsn::build(&self.host, original, &body, failures, &date, &message_id)?;
        let envelope = Envelope {
            id: dsn_id,
            sender: String::new(),
            recipients: vec![Recipient {
                address: n.recipient,
                state: RcptState::Pending { attempts: 0 },
            }],
            arrived_ms: now_ms(),
            holders: Vec::new(),
        };
        Some((envelope, Bytes::from(n.body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_file_that_cannot_be_read_holds_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held");
        let file = HeldFile::new(Some(path.clone()));
        assert_eq!(file.load(), Held::These(HashSet::new()), "no file yet");
        std::fs::write(&path, "00000000000000A1\n00000000000000B2\n").unwrap();
        let ids = HashSet::from([QueueId(0xA1), QueueId(0xB2)]);
        assert_eq!(file.load(), Held::These(ids));
        // A torn or foreign line: which were held is unknown.
        std::fs::write(&path, "00000000000000A1\n0000garbage\n").unwrap();
        assert_eq!(file.load(), Held::Unknown);
        // Unreadable.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert_eq!(file.load(), Held::Unknown);
        assert_eq!(HeldFile::new(None).load(), Held::These(HashSet::new()));
    }

    /// A dispatcher that hands each job's message id to a channel.
    struct Jobs(mpsc::UnboundedSender<QueueId>);

    impl Dispatch for Jobs {
        fn dispatch(&self, _: usize, _: Arc<Route>, job: Job) {
            let _ = self.0.send(job.id);
        }
    }

    #[tokio::test]
    async fn jobs_wait_for_the_delivery_gate_and_what_is_deleted_meanwhile_never_leaves() {
        let spool: Arc<dyn Spool> = Arc::new(crate::spool::MemorySpool::new());
        let (dispatched, mut jobs) = mpsc::unbounded_channel();
        let (_results_tx, results) = mpsc::unbounded_channel();
        let gate = Gate::shut();
        let config = Arc::new(core::tests::config());
        let queue = spawn(QueueParts {
            config: tokio::sync::watch::channel(config).1,
            spool: spool.clone(),
            dispatch: Arc::new(Jobs(dispatched)),
            results,
            ids: Arc::new(IdGen::new(QueueId(100))),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            stats: tokio::sync::watch::channel(Stats::default()).0,
            held_file: None,
            gate: gate.clone(),
        });
        for id in [1, 2] {
            let m = core::tests::message(id, &["r@a.example"]);
            spool
                .store(m.clone(), Bytes::from_static(b"x"))
                .await
                .unwrap();
            queue.admit(m);
        }
        // Both are decided (in flight, not waiting for a retry) and parked;
        // admissions and requests come on separate channels.
        let listed = async {
            while queue
                .list(Filter::default(), None, 10)
                .await
                .unwrap()
                .messages
                .len()
                < 2
            {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), listed)
            .await
            .unwrap();
        assert!(jobs.try_recv().is_err(), "a shut gate let a job through");
        let sel = Selector {
            ids: vec![QueueId(1).to_string()],
            ..Selector::default()
        };
        assert_eq!(queue.act(Op::Delete, sel).await, Some(Ok(1)));
        gate.open_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(jobs.recv().await, Some(QueueId(2)));
        // Nothing else was parked: the deleted one stays gone.
        let list = queue.list(Filter::default(), None, 10).await.unwrap();
        assert_eq!(list.messages.len(), 1);
        assert!(jobs.try_recv().is_err());
    }
}
