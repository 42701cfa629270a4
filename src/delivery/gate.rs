//! The delivery gate: whether this node may send mail now.
//!
//! A single node always may. A cluster member may only while it holds its
//! delivery lease (see `cluster::state::groups`): once the cluster has
//! taken that lease back, a survivor delivers this node's shadow copies,
//! and if this node went on too, mail would leave twice. So the gate is
//! open only up to the end of the lease it was last told of — a process
//! that was frozen finds it shut on waking, before anything can tell it so
//! — and shutting it cuts every association at once.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

type Hook = Box<dyn Fn() + Send + Sync>;

/// Whether this node may deliver; shared by the queue and delivery.
pub struct Gate {
    /// Open (`None` in `until`: for ever) or shut.
    open: watch::Sender<bool>,
    /// The end of the lease the gate is open under; None: no end.
    until: Mutex<Option<Instant>>,
    /// Called when it shuts: cut the deliveries in flight.
    on_shut: Mutex<Vec<Hook>>,
}

impl Gate {
    /// A gate that is always open (a node outside a cluster).
    pub fn always() -> Arc<Gate> {
        Arc::new(Gate {
            open: watch::Sender::new(true),
            until: Mutex::new(None),
            on_shut: Mutex::default(),
        })
    }

    /// A gate that is shut until a lease opens it (a cluster member).
    pub fn shut() -> Arc<Gate> {
        let g = Gate::always();
        g.open.send_replace(false);
        g
    }

    /// Open it until `until` (the lease's end); a later call moves the end.
    pub fn open_until(&self, until: Instant) {
        *self.lock_until() = Some(until);
        self.open.send_if_modified(|o| !std::mem::replace(o, true));
    }

    /// Move the end of an open gate's lease; a shut gate stays shut.
    pub fn extend(&self, until: Instant) {
        if *self.open.borrow() {
            *self.lock_until() = Some(until);
        }
    }

    /// Shut it, and cut whatever is being delivered.
    pub fn shut_now(&self) {
        if self.open.send_replace(false) {
            for hook in self
                .on_shut
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                hook();
            }
        }
    }

    /// Whether mail may leave now.
    pub fn is_open(&self) -> bool {
        *self.open.borrow() && self.lock_until().is_none_or(|t| Instant::now() < t)
    }

    /// Call `hook` each time the gate shuts.
    pub fn on_shut(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.on_shut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// A receiver that sees it open and shut (not each lease renewal).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.open.subscribe()
    }

    fn lock_until(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.until.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_gate_is_open_only_within_its_lease_and_cuts_deliveries_when_shut() {
        assert!(Gate::always().is_open());
        let g = Gate::shut();
        assert!(!g.is_open());
        let cuts = Arc::new(AtomicUsize::new(0));
        let c = cuts.clone();
        g.on_shut(move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        g.extend(Instant::now() + Duration::from_secs(9));
        assert!(!g.is_open(), "a renewal does not open a shut gate");
        g.open_until(Instant::now() + Duration::from_secs(1));
        assert!(g.is_open());
        g.extend(Instant::now() + Duration::from_secs(2));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(g.is_open(), "the renewal moved the end");
        // A process frozen past its lease finds the gate shut on waking.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!g.is_open());
        assert_eq!(cuts.load(Ordering::SeqCst), 0);
        g.shut_now();
        g.shut_now();
        assert_eq!(cuts.load(Ordering::SeqCst), 1, "cut once per shutting");
    }
}
