//! The memory held by message bodies while they are received, counted for
//! the whole node. `max_message_size` bounds one session; this bounds all
//! of them together, so that many clients sending large messages at once
//! get `452 4.3.1` (try again later) instead of exhausting the machine.
//! The limit is read from each session's configuration, so a reload
//! changes it for sessions that start afterwards. One client address
//! (outside `relay_networks`) may hold a quarter of it, or one message
//! of the largest size if that is more, so a few slow senders cannot
//! starve everyone else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::budget::Budget;

/// Bytes held by bodies being received or stored, across sessions.
#[derive(Debug, Default)]
pub struct BodyMemory {
    used: AtomicU64,
}

impl BodyMemory {
    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether `n` more bytes would fit under `limit` now.
    pub fn has_room(&self, n: u64, limit: u64) -> bool {
        self.used().saturating_add(n) <= limit
    }

    fn take(&self, n: u64, limit: u64) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&after| after <= limit)
            })
            .is_ok();
        if taken {
            crate::metrics::smtp_body_memory(n as f64);
        }
        taken
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
        crate::metrics::smtp_body_memory(-(n as f64));
    }
}

/// The part of `limit` one client address may hold.
pub fn client_share(limit: u64, max_message_size: u64) -> u64 {
    (limit / 4).max(max_message_size)
}

/// What one body holds of the node's memory; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    memory: Arc<BodyMemory>,
    limit: u64,
    /// The client address's budget and its share, when it is limited.
    client: Option<(Arc<dyn Budget>, u64)>,
    held: u64,
}

impl Charge {
    /// Holds nothing yet; may grow to what `limit` leaves room for.
    pub fn new(memory: Arc<BodyMemory>, limit: u64) -> Charge {
        Charge {
            memory,
            limit,
            client: None,
            held: 0,
        }
    }

    /// Counts against the client address's `share` too.
    pub fn for_client(mut self, budget: Arc<dyn Budget>, share: u64) -> Charge {
        self.client = Some((budget, share));
        self
    }

    /// Holds at least `n` bytes; false (holding what it held) when the
    /// node's memory for bodies is spent.
    pub fn cover(&mut self, n: u64) -> bool {
        if n <= self.held {
            return true;
        }
        let more = n - self.held;
        if let Some((client, share)) = &self.client {
            if !client.take_memory(more, *share) {
                return false;
            }
        }
        if !self.memory.take(more, self.limit) {
            if let Some((client, _)) = &self.client {
                client.give_memory(more);
            }
            return false;
        }
        self.held = n;
        true
    }

    /// Gives everything back now.
    pub fn release(&mut self) {
        if self.held > 0 {
            self.memory.give(self.held);
            if let Some((client, _)) = &self.client {
                client.give_memory(self.held);
            }
            self.held = 0;
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_share_the_limit_and_give_back_on_drop() {
        let m = Arc::new(BodyMemory::default());
        let mut a = Charge::new(m.clone(), 100);
        let mut b = Charge::new(m.clone(), 100);
        assert!(a.cover(60));
        assert!(a.cover(40), "already held");
        assert_eq!(m.used(), 60);
        assert!(!b.cover(41));
        assert_eq!(m.used(), 60, "a refused charge takes nothing");
        assert!(b.cover(40));
        assert!(!m.has_room(1, 100));
        drop(a);
        assert_eq!(m.used(), 40);
        assert!(b.cover(100));
        b.release();
        assert_eq!(m.used(), 0);
        drop(b);
        assert_eq!(m.used(), 0, "released once");
    }

    /// A client's budget that only counts memory.
    #[derive(Debug, Default)]
    struct Share(std::sync::Mutex<u64>);

    impl Budget for Share {
        fn message(&self) -> bool {
            true
        }
        fn recipient(&self) -> bool {
            true
        }
        fn take_memory(&self, n: u64, share: u64) -> bool {
            let mut held = self.0.lock().unwrap();
            if *held + n > share {
                return false;
            }
            *held += n;
            true
        }
        fn give_memory(&self, n: u64) {
            *self.0.lock().unwrap() -= n;
        }
    }

    #[test]
    fn one_client_holds_no_more_than_its_share() {
        let m = Arc::new(BodyMemory::default());
        let client = Arc::new(Share::default());
        let mut a = Charge::new(m.clone(), 1000).for_client(client.clone(), 300);
        let mut b = Charge::new(m.clone(), 1000).for_client(client.clone(), 300);
        assert!(a.cover(200));
        assert!(!b.cover(101), "over the client's share");
        assert!(b.cover(100));
        // Another client still has the rest of the node's memory.
        let mut other = Charge::new(m.clone(), 1000);
        assert!(other.cover(700));
        // The node's memory runs out first: the client's share is given
        // back too.
        drop(a);
        assert!(other.cover(750));
        assert!(!b.cover(300));
        assert_eq!(*client.0.lock().unwrap(), 100);
        drop(b);
        assert_eq!(*client.0.lock().unwrap(), 0);
        assert_eq!(m.used(), 750);
        assert_eq!(client_share(1000, 100), 250);
        assert_eq!(client_share(1000, 400), 400);
    }

    #[test]
    fn growing_takes_only_the_difference() {
        let m = Arc::new(BodyMemory::default());
        let mut a = Charge::new(m.clone(), 1000);
        for n in [10, 20, 400, 1000] {
            assert!(a.cover(n));
            assert_eq!(m.used(), n);
        }
        assert!(!a.cover(1001));
        assert_eq!(m.used(), 1000);
    }
}
