//! The spool: durable storage of accepted messages.
//!
//! Nothing is acknowledged to a client before `Spool::store` returns Ok,
//! and `store` returns only after the message is on disk (fsync).
//!
//! May import: `config`, `metrics` and `clock`.

use bytes::Bytes;

pub mod disk;
pub mod memory;
mod record;

pub use disk::DiskSpool;
pub use memory::MemorySpool;

/// A future returned by a spool operation.
pub type SpoolFuture<'a, T> = futures_util::future::BoxFuture<'a, Result<T, SpoolError>>;

/// Queue id: unique per node, shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u64);

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

/// Why a spool operation failed. Every variant means "not durable".
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The disk is full.
    #[error("spool is full")]
    Full,
    /// An I/O error, fsync included.
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// No message with that id.
    #[error("no message {0} in the spool")]
    NotFound(QueueId),
    /// A record failed its checksum where it must be intact.
    #[error("spool corrupt: {0}")]
    Corrupt(String),
    /// The spool's writer has stopped.
    #[error("spool is closed")]
    Closed,
    /// Fewer durable copies (this node's and shadow copies on other
    /// members) than `[spool] min_replicas`: not acknowledged; the client
    /// may try again later.
    #[error("only {made} of the {needed} copies required could be made")]
    Replicas {
        /// Copies made durable.
        made: u8,
        /// Copies required.
        needed: u8,
    },
}

/// Delivery state of one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptState {
    /// Still to be delivered; `attempts` made so far.
    Pending {
        /// Attempts made so far.
        attempts: u32,
    },
    /// Delivered, bounced or expired: nothing more to do.
    Done,
}

/// One envelope recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The address as given in RCPT TO, without angle brackets.
    pub address: String,
    /// Its delivery state.
    pub state: RcptState,
}

/// Everything about a message except its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The queue id.
    pub id: QueueId,
    /// Reverse path; empty for the null sender `<>`.
    pub sender: String,
    /// Forward paths.
    pub recipients: Vec<Recipient>,
    /// When the message was accepted, in milliseconds since the Unix epoch.
    pub arrived_ms: u64,
    /// The other nodes holding a shadow copy of it (cluster node ids),
    /// so that whoever takes over a dead node's messages knows whose
    /// they were; empty when it is kept here alone.
    pub holders: Vec<u64>,
}

impl Envelope {
    /// Whether every recipient is done.
    pub fn is_finished(&self) -> bool {
        self.recipients.iter().all(|r| r.state == RcptState::Done)
    }
}

/// A message recovered from the spool at start-up.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// Its envelope with recipient states as last recorded.
    pub envelope: Envelope,
}

/// Durable message storage.
///
/// `store`, `update` and `remove` return only when their record is durable;
/// implementations batch concurrent calls into one fsync (group commit).
pub trait Spool: Send + Sync + 'static {
    /// Durably store a new message (envelope and content).
    fn store(&self, envelope: Envelope, body: Bytes) -> SpoolFuture<'_, ()>;
    /// Durably record new states of some recipients of a stored message.
    ///
    /// Only the named recipients change, so concurrent updates from
    /// different destinations (disjoint recipients) commute.
    fn update(&self, id: QueueId, changes: Vec<(usize, RcptState)>) -> SpoolFuture<'_, ()>;
    /// Durably forget a message whose recipients are all done.
    fn remove(&self, id: QueueId) -> SpoolFuture<'_, ()>;
    /// Durably record which nodes hold shadow copies of a stored message
    /// (a holder whose copy failed is struck off before "250").
    fn set_holders(&self, id: QueueId, holders: Vec<u64>) -> SpoolFuture<'_, ()>;
    /// Read a stored message's content.
    fn body(&self, id: QueueId) -> SpoolFuture<'_, Bytes>;
    /// Messages that were stored and not removed, as of opening.
    fn recovered(&self) -> Vec<Recovered>;
    /// Answers once the spool would take a write now: behind every write
    /// already asked for (a hung fsync holds it up). Writes nothing.
    fn probe(&self) -> SpoolFuture<'_, ()>;
}

/// Hands out queue ids: the current time in milliseconds shifted left 16
/// bits plus a counter, so ids grow across restarts and never repeat.
#[derive(Debug)]
pub struct IdGen(std::sync::atomic::AtomicU64);

impl IdGen {
    /// A generator whose ids are all above `floor` and the current time.
    pub fn new(floor: QueueId) -> Self {
        let now = crate::clock::now_ms();
        Self(std::sync::atomic::AtomicU64::new(
            (now << 16).max(floor.0 + 1),
        ))
    }

    /// The next id.
    pub fn next(&self) -> QueueId {
        QueueId(self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}
