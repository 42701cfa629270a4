//! A destination's ready queue, shared by its associations, and what every
//! association shares.
//!
//! Every decision that reads the queue and the association count is made
//! under the destination's lock, so a job can never be left in a queue
//! that no association will serve.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::gate::Gate;
use super::pool::{Next, Policy};
use super::tls::{Connectors, OutboundTls};
use super::{Job, JobResult, Outcome, RcptResult};
use crate::config::DeliveryConfig;
use crate::events::AssociationReason;
use crate::spool::Spool;

/// What the admin interface and metrics see of one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationStatus {
    /// Name for logs: the first next hop, plus the source address if set.
    pub name: String,
    /// Jobs waiting in the ready queue.
    pub backlog: usize,
    /// Associations open or being opened.
    pub associations: usize,
    /// Associations with an established SMTP session.
    pub established: usize,
}

/// What every association of every destination needs.
pub(crate) struct Shared {
    /// `[delivery]` as a reload leaves it: each association keeps what it
    /// started with.
    settings: watch::Receiver<Arc<DeliveryConfig>>,
    pub helo_name: String,
    /// TLS connectors, built once per kind.
    pub connectors: Connectors,
    pub spool: Arc<dyn Spool>,
    pub results: UnboundedSender<JobResult>,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    /// Whether mail may leave now (a cluster member's delivery lease).
    pub gate: Arc<Gate>,
    next_id: AtomicU64,
}

impl Shared {
    /// What associations share, reporting on `results`; they are spawned
    /// on `tracker` and stop when `cancel` fires.
    pub fn new(
        settings: watch::Receiver<Arc<DeliveryConfig>>,
        helo_name: String,
        spool: Arc<dyn Spool>,
        results: UnboundedSender<JobResult>,
        cancel: CancellationToken,
        tracker: TaskTracker,
        gate: Arc<Gate>,
    ) -> Self {
        Self {
            settings,
            helo_name,
            connectors: Connectors::default(),
            spool,
            results,
            cancel,
            tracker,
            gate,
            next_id: AtomicU64::new(0),
        }
    }

    /// `[delivery]` now.
    pub fn cfg(&self) -> Arc<DeliveryConfig> {
        self.settings.borrow().clone()
    }

    /// The pool policy now.
    pub fn policy(&self) -> Policy {
        Policy::from_config(&self.settings.borrow())
    }

    /// A fresh association id for logs.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Send one job's results to the node; a closed channel means the node
    /// is shutting down, and the job is safe in the spool.
    pub fn report(&self, q: &Queued, next_hop: &str, results: Vec<RcptResult>) {
        let _ = self.results.send(JobResult {
            id: q.job.id,
            route: q.route,
            next_hop: next_hop.to_string(),
            results,
        });
    }

    /// Report every recipient of a job with the same outcome and reply.
    pub fn report_all(&self, q: &Queued, next_hop: &str, outcome: Outcome, reply: &str) {
        let results = q
            .job
            .recipients
            .iter()
            .map(|r| RcptResult {
                index: r.index,
                outcome,
                reply: reply.to_string(),
            })
            .collect();
        self.report(q, next_hop, results);
    }
}

/// The reply for jobs whose source address was withdrawn.
pub(crate) const WITHDRAWN: &str =
    "451 4.4.0 the address this mail left from moved to another node";

/// A job waiting for or held by an association.
#[derive(Debug)]
pub(crate) struct Queued {
    pub job: Job,
    pub route: usize,
    /// Already put back once after a stall: a second stall defers it, so a
    /// message that stalls every peer cannot circulate forever.
    pub requeued: bool,
}

/// One destination: its ready queue and association count.
pub(crate) struct Destination {
    pub name: String,
    pub hops: Vec<SocketAddr>,
    pub source: Option<IpAddr>,
    /// The route's TLS settings.
    pub tls: OutboundTls,
    state: Mutex<QueueState>,
    /// One permit per submitted job: wakes an idle association.
    pub work: Notify,
    /// Cancelled when the source address is withdrawn.
    pub fence: CancellationToken,
    /// Next hops that answered a whole transaction with 4xx, and until
    /// when new associations skip them for the next ones.
    avoided: Mutex<Vec<(SocketAddr, tokio::time::Instant)>>,
}

/// How long a next hop that deferred a whole transaction is passed over
/// for the next ones (RFC 5321 5.1: try the next MX on a temporary
/// failure).
pub(crate) const AVOID: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Queued>,
    associations: usize,
    established: usize,
    /// The source address was withdrawn: no job is taken any more.
    withdrawn: bool,
}

impl Destination {
    /// A destination with an empty ready queue; `name` is for logs.
    pub fn new(
        name: String,
        hops: Vec<SocketAddr>,
        source: Option<IpAddr>,
        tls: OutboundTls,
    ) -> Self {
        Destination {
            name,
            hops,
            source,
            tls,
            state: Mutex::default(),
            work: Notify::new(),
            fence: CancellationToken::new(),
            avoided: Mutex::default(),
        }
    }

    /// Pass over `hop` for `AVOID` if a later next hop remains to try;
    /// whether it will be.
    pub fn avoid(&self, hop: SocketAddr) -> bool {
        if self.hops.last() == Some(&hop) {
            return false;
        }
        let until = tokio::time::Instant::now() + AVOID;
        let mut avoided = self.avoided.lock().unwrap_or_else(|e| e.into_inner());
        avoided.retain(|(h, _)| *h != hop);
        avoided.push((hop, until));
        true
    }

    /// The next hops to try now, in order: those passed over go last.
    pub fn hops_now(&self) -> Vec<SocketAddr> {
        let now = tokio::time::Instant::now();
        let mut avoided = self.avoided.lock().unwrap_or_else(|e| e.into_inner());
        avoided.retain(|(_, until)| *until > now);
        let (later, first): (Vec<SocketAddr>, Vec<SocketAddr>) = self
            .hops
            .iter()
            .partition(|h| avoided.iter().any(|(a, _)| a == *h));
        first.into_iter().chain(later).collect()
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic elsewhere must not stop delivery; the state stays consistent
        // because every critical section is a few field updates.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a job, and count the associations `policy` opens for the new
    /// backlog (their reasons are returned: the caller starts them). A
    /// withdrawn destination hands the job back.
    pub fn push(&self, q: Queued, policy: &Policy) -> Result<Vec<AssociationReason>, Queued> {
        let mut opens = Vec::new();
        {
            let mut st = self.lock();
            if st.withdrawn {
                return Err(q);
            }
            st.jobs.push_back(q);
            while let Some(reason) = policy.open(st.jobs.len(), st.associations) {
                st.associations += 1;
                opens.push(reason);
            }
        }
        self.work.notify_one();
        Ok(opens)
    }

    /// Take no job any more; the jobs waiting are handed back, and the
    /// associations are told to stop.
    pub fn withdraw(&self) -> Vec<Queued> {
        let jobs = {
            let mut st = self.lock();
            st.withdrawn = true;
            st.jobs.drain(..).collect()
        };
        self.fence.cancel();
        jobs
    }

    /// Decide what an association does with the current backlog, and if it
    /// takes work, pop the job in the same critical section.
    pub fn decide(&self, f: impl FnOnce(usize) -> Next) -> (Next, Option<Queued>) {
        let mut st = self.lock();
        let next = f(st.jobs.len());
        let job = match next {
            Next::Take { .. } => st.jobs.pop_front(),
            _ => None,
        };
        (next, job)
    }

    /// Put a job whose outcome is unknown back at the front; after a
    /// withdrawal it is handed back instead, to be reported deferred.
    #[must_use]
    pub fn requeue_front(&self, q: Queued) -> Option<Queued> {
        let mut st = self.lock();
        if st.withdrawn {
            return Some(q);
        }
        st.jobs.push_front(q);
        drop(st);
        self.work.notify_one();
        None
    }

    /// Jobs waiting.
    pub fn backlog(&self) -> usize {
        self.lock().jobs.len()
    }

    /// An association's session was established (`true`) or ended.
    pub fn set_established(&self, up: bool) {
        let mut st = self.lock();
        if up {
            st.established += 1;
        } else {
            st.established = st.established.saturating_sub(1);
        }
    }

    /// An association ends; unless `force`, it stays (returns false) when
    /// work is waiting, since it may be the last one serving the queue.
    pub fn retire(&self, force: bool) -> bool {
        let mut st = self.lock();
        if !force && !st.withdrawn && !st.jobs.is_empty() {
            return false;
        }
        st.associations = st.associations.saturating_sub(1);
        true
    }

    /// An association could not reach any next hop and ends. When no other
    /// association is established, the waiting jobs are returned to be
    /// failed: mail goes to the retry schedule instead of a hot loop.
    pub fn retire_unreachable(&self) -> Vec<Queued> {
        let mut st = self.lock();
        st.associations = st.associations.saturating_sub(1);
        if st.established == 0 {
            st.jobs.drain(..).collect()
        } else {
            Vec::new()
        }
    }

    /// What the admin interface and metrics see of it.
    pub fn status(&self) -> DestinationStatus {
        let st = self.lock();
        DestinationStatus {
            name: self.name.clone(),
            backlog: st.jobs.len(),
            associations: st.associations,
            established: st.established,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_hop_that_deferred_goes_last_for_a_while_but_never_the_last_one() {
        let hops: Vec<SocketAddr> = ["127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:1"]
            .iter()
            .map(|h| h.parse().unwrap())
            .collect();
        let d = Destination::new("d".into(), hops.clone(), None, OutboundTls::NONE);
        assert_eq!(d.hops_now(), hops);
        assert!(d.avoid(hops[0]));
        assert_eq!(d.hops_now(), vec![hops[1], hops[2], hops[0]]);
        // The last hop has no later one to go to.
        assert!(!d.avoid(hops[2]));
        assert_eq!(d.hops_now(), vec![hops[1], hops[2], hops[0]]);
        tokio::time::advance(AVOID).await;
        assert_eq!(d.hops_now(), hops);
    }
}
