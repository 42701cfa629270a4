//! The front of outbound delivery: the destinations mail goes to, each
//! with its ready queue ([`ready`](super::ready)) and the associations
//! that drain it.
//!
//! A destination is a list of next hops plus a source address.
//!
//! When a source address is withdrawn (its group moved to another node),
//! every destination that leaves from it is cut off at once: its
//! associations stop mid-transaction, and every job it held goes back to
//! the queue as deferred — never again sent from that address here.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::association;
use super::gate::Gate;
use super::ready::{Destination, Queued, Shared, WITHDRAWN};
use super::tls::OutboundTls;
use super::{Job, JobResult, Outcome};
use crate::config::DeliveryConfig;
use crate::spool::Spool;

pub use super::ready::DestinationStatus;

/// The outbound delivery front: the node submits jobs here and reads
/// results from the channel it passed to `new`.
#[derive(Clone)]
pub struct Destinations {
    shared: Arc<Shared>,
    map: Arc<Mutex<HashMap<Key, Arc<Destination>>>>,
}

type Key = (Vec<SocketAddr>, Option<IpAddr>, OutboundTls);

impl Destinations {
    /// A front with no destinations yet; associations are spawned on
    /// `tracker` and stop when `cancel` fires.
    pub fn new(
        settings: watch::Receiver<Arc<DeliveryConfig>>,
        helo_name: String,
        spool: Arc<dyn Spool>,
        results: UnboundedSender<JobResult>,
        cancel: CancellationToken,
        tracker: TaskTracker,
        gate: Arc<Gate>,
    ) -> Self {
        let d = Self {
            shared: Arc::new(Shared::new(
                settings, helo_name, spool, results, cancel, tracker, gate,
            )),
            map: Arc::default(),
        };
        // A fenced node sends nothing more, not even what it has begun.
        let weak = Arc::downgrade(&d.map);
        let shared = Arc::downgrade(&d.shared);
        d.shared.gate.on_shut(move || {
            if let (Some(map), Some(shared)) = (weak.upgrade(), shared.upgrade()) {
                Destinations { shared, map }.withdraw_where(|_| true, "delivery gate shut");
            }
        });
        d
    }

    /// Queue a job for the destination (`next_hops`, `source`, `tls`)
    /// that `route` chose; opens associations as the pool policy says. Its
    /// result comes back on the results channel, unless the node shuts
    /// down first.
    pub fn submit(
        &self,
        route: usize,
        next_hops: &[SocketAddr],
        source: Option<IpAddr>,
        tls: &OutboundTls,
        job: Job,
    ) {
        if self.shared.cancel.is_cancelled() {
            return;
        }
        let dest = self.destination(next_hops, source, tls);
        let q = Queued {
            job,
            route,
            requeued: false,
        };
        match dest.push(q, &self.shared.policy()) {
            Ok(opens) => {
                for reason in opens {
                    let task = association::run(self.shared.clone(), dest.clone(), reason);
                    self.shared.tracker.spawn(task);
                }
            }
            // Withdrawn between the lookup and now.
            Err(q) => self
                .shared
                .report_all(&q, &dest.name, Outcome::Deferred, WITHDRAWN),
        }
    }

    /// Cut off every destination that leaves from `source`: its
    /// associations stop, and its jobs are reported deferred.
    pub fn withdraw(&self, source: IpAddr) {
        self.withdraw_where(|k| k.1 == Some(source), "source address withdrawn");
    }

    /// Cut off every destination whose key passes `which`, saying `why`.
    fn withdraw_where(&self, which: impl Fn(&Key) -> bool, why: &str) {
        let gone: Vec<Arc<Destination>> = {
            let mut map = self.lock_map();
            let keys: Vec<Key> = map.keys().filter(|k| which(k)).cloned().collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for d in gone {
            let jobs = d.withdraw();
            tracing::info!(destination = %d.name, jobs = jobs.len(), "{why}: associations cut");
            for q in &jobs {
                self.shared
                    .report_all(q, &d.name, Outcome::Deferred, WITHDRAWN);
            }
        }
    }

    /// Every destination seen so far, sorted by name.
    pub fn snapshot(&self) -> Vec<DestinationStatus> {
        let dests: Vec<_> = self.lock_map().values().cloned().collect();
        let mut v: Vec<_> = dests.iter().map(|d| d.status()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn lock_map(&self) -> MutexGuard<'_, HashMap<Key, Arc<Destination>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn destination(
        &self,
        next_hops: &[SocketAddr],
        source: Option<IpAddr>,
        tls: &OutboundTls,
    ) -> Arc<Destination> {
        let mut map = self.lock_map();
        let key = (next_hops.to_vec(), source, tls.clone());
        map.entry(key)
            .or_insert_with(|| {
                let mut name = next_hops
                    .first()
                    .map_or_else(|| "(no next hop)".to_string(), |h| h.to_string());
                if let Some(src) = source {
                    name = format!("{name} from {src}");
                }
                Arc::new(Destination::new(
                    name,
                    next_hops.to_vec(),
                    source,
                    tls.clone(),
                ))
            })
            .clone()
    }
}
