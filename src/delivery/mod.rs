//! Outbound delivery: the pure SMTP client machine, associations (persistent
//! sessions to one destination) and the per-destination association pool.
//!
//! The queue hands `Job`s to a destination and gets `JobResult`s back; what
//! happens between (how many associations, when to renegotiate) is decided
//! here.
//!
//! May import: `config`, `spool`, `events` and `clock`.

mod association;
pub mod client;
mod destinations;
pub mod drop_dir;
pub mod gate;
pub mod pool;
mod ready;
pub mod tls;

pub use destinations::{DestinationStatus, Destinations};

use crate::spool::QueueId;

/// One message's recipients for one destination: one SMTP transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The message.
    pub id: QueueId,
    /// Reverse path, empty for `<>`.
    pub sender: String,
    /// The recipients this destination should take.
    pub recipients: Vec<JobRcpt>,
    /// When the message expires (ms since the Unix epoch; 0: never): it
    /// is not sent after that, and the queue bounces it.
    pub expires_ms: u64,
}

impl Job {
    /// Whether the message has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && now_ms >= self.expires_ms
    }
}

/// A recipient inside a job, with its index in the envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRcpt {
    /// Index into `Envelope::recipients`.
    pub index: usize,
    /// The address.
    pub address: String,
}

/// What became of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the next hop took responsibility.
    Delivered,
    /// 4xx or a connection problem: try again later.
    Deferred,
    /// 5xx: never going to work; bounce.
    Failed,
}

/// The result for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptResult {
    /// Index into `Envelope::recipients`.
    pub index: usize,
    /// What happened.
    pub outcome: Outcome,
    /// The reply that decided it, e.g. `250 2.0.0 Ok` or a local reason.
    pub reply: String,
}

/// The result of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobResult {
    /// The message.
    pub id: QueueId,
    /// Index of the route the job went through.
    pub route: usize,
    /// The next hop that answered (address or drop directory), or empty.
    pub next_hop: String,
    /// One entry per job recipient.
    pub results: Vec<RcptResult>,
}

impl JobResult {
    /// `outcome` with `reply` for every recipient of `job`.
    pub fn all(job: &Job, route: usize, next_hop: String, outcome: Outcome, reply: &str) -> Self {
        JobResult {
            id: job.id,
            route,
            next_hop,
            results: job
                .recipients
                .iter()
                .map(|r| RcptResult {
                    index: r.index,
                    outcome,
                    reply: reply.to_string(),
                })
                .collect(),
        }
    }
}
