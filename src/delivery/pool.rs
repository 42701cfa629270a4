//! Association pool policy: when a destination opens another association,
//! and what an open association does next (take work, wait, renegotiate,
//! close). Pure: the caller passes the time in.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::DeliveryConfig;
use crate::events::AssociationReason;

/// The pool limits of one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Backlog per open association before another one is opened.
    pub threshold: usize,
    /// Most associations per destination, counting those being opened.
    pub max_associations: usize,
    /// Transactions an association carries before it is renegotiated.
    pub max_messages: u64,
    /// Age after which an association is renegotiated.
    pub lifetime: Duration,
    /// Time without work after which an association is closed.
    pub idle_timeout: Duration,
    /// Time without progress, while there is work, before a teardown.
    pub stall_timeout: Duration,
    /// Longest one transaction may take in all.
    pub transaction_timeout: Duration,
}

impl Policy {
    /// The policy configured in `[delivery]`.
    pub fn from_config(cfg: &DeliveryConfig) -> Self {
        Self {
            threshold: cfg.association_threshold,
            max_associations: cfg.max_associations,
            max_messages: cfg.max_messages_per_association,
            lifetime: cfg.association_lifetime,
            idle_timeout: cfg.idle_timeout,
            stall_timeout: cfg.stall_timeout,
            transaction_timeout: cfg.transaction_timeout,
        }
    }

    /// Whether a destination with `backlog` waiting jobs and `associations`
    /// open or opening should open one more, and why. Call again after
    /// counting the new one to open several.
    pub fn open(&self, backlog: usize, associations: usize) -> Option<AssociationReason> {
        // A zero limit would leave mail stranded; one association is the floor.
        if backlog == 0 || associations >= self.max_associations.max(1) {
            return None;
        }
        if associations == 0 {
            return Some(AssociationReason::Demand);
        }
        (backlog >= self.threshold.max(1).saturating_mul(associations))
            .then_some(AssociationReason::Threshold)
    }

    /// What an open association with no transaction in hand does next.
    pub fn next(&self, a: &Association, now: Instant, backlog: usize) -> Next {
        let has_work = backlog > 0;
        if has_work
            && a.failing_since
                .is_some_and(|t| now >= t + self.stall_timeout)
        {
            return Next::Stall;
        }
        let spent = if a.messages >= self.max_messages.max(1) {
            Some(AssociationReason::Count)
        } else if now >= a.opened + self.lifetime {
            Some(AssociationReason::Lifetime)
        } else {
            None
        };
        match (spent, has_work) {
            (Some(reason), true) => Next::Renegotiate(reason),
            (Some(reason), false) => Next::Close(reason),
            (None, true) => Next::Take {
                reused: a.idle_since.is_some(),
            },
            (None, false) => {
                let idle_since = a.idle_since.unwrap_or(now);
                let idle_end = idle_since + self.idle_timeout;
                if now >= idle_end {
                    Next::Close(AssociationReason::Idle)
                } else {
                    Next::Wait {
                        until: idle_end.min(a.opened + self.lifetime),
                    }
                }
            }
        }
    }
}

/// What an association does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Take the job at the front of the ready queue; `reused` when the
    /// association was idle before (log `association_reused` once).
    Take {
        /// The association was idle before this job.
        reused: bool,
    },
    /// Nothing to do: wait for work until `until`, then ask again.
    Wait {
        /// When to ask again even without new work.
        until: Instant,
    },
    /// QUIT and close for good.
    Close(AssociationReason),
    /// QUIT, close, and open a fresh association for the waiting work.
    Renegotiate(AssociationReason),
    /// Every transaction since the last success was refused for too long:
    /// tear down and open a fresh association.
    Stall,
}

/// The bookkeeping of one open association that the policy reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Association {
    /// When the session was established.
    pub opened: Instant,
    /// Transactions started on it.
    pub messages: u64,
    /// Since when it has had nothing to do, if it is idle.
    pub idle_since: Option<Instant>,
    /// Since when every transaction has been refused as a whole.
    pub failing_since: Option<Instant>,
}

impl Association {
    /// A session established at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            opened: now,
            messages: 0,
            idle_since: None,
            failing_since: None,
        }
    }

    /// It found no work at `now` (keeps the earliest such time).
    pub fn idle(&mut self, now: Instant) {
        self.idle_since.get_or_insert(now);
    }

    /// It took a job.
    pub fn took(&mut self) {
        self.idle_since = None;
        self.messages += 1;
    }

    /// A transaction finished at `now`; `progress` is false when the server
    /// refused it as a whole (MAIL or RSET rejected).
    pub fn finished(&mut self, now: Instant, progress: bool) {
        if progress {
            self.failing_since = None;
        } else {
            self.failing_since.get_or_insert(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AssociationReason::*;

    fn policy() -> Policy {
        Policy {
            threshold: 50,
            max_associations: 4,
            max_messages: 100,
            lifetime: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
            transaction_timeout: Duration::from_secs(600),
        }
    }

    /// How many a destination opens for `backlog` starting from `open`.
    fn opened(p: &Policy, backlog: usize, mut open: usize) -> Vec<AssociationReason> {
        let mut v = Vec::new();
        while let Some(r) = p.open(backlog, open) {
            v.push(r);
            open += 1;
        }
        v
    }

    #[test]
    fn opens_on_demand_then_per_threshold_up_to_max() {
        let p = policy();
        assert_eq!(opened(&p, 0, 0), vec![]);
        assert_eq!(opened(&p, 1, 0), vec![Demand]);
        assert_eq!(opened(&p, 49, 0), vec![Demand]);
        assert_eq!(opened(&p, 50, 0), vec![Demand, Threshold]);
        assert_eq!(opened(&p, 99, 1), vec![Threshold]);
        assert_eq!(opened(&p, 100, 1), vec![Threshold, Threshold]);
        assert_eq!(opened(&p, 149, 3), vec![]);
        assert_eq!(opened(&p, 150, 3), vec![Threshold]);
        assert_eq!(
            opened(&p, 10_000, 0),
            vec![Demand, Threshold, Threshold, Threshold]
        );
        assert_eq!(opened(&p, 10_000, 4), vec![]);
        assert_eq!(opened(&p, 10_000, 7), vec![]);
    }

    #[test]
    fn open_exhaustive_invariants() {
        for threshold in 0..5 {
            for max in 0..5 {
                let p = Policy {
                    threshold,
                    max_associations: max,
                    ..policy()
                };
                for backlog in 0..30 {
                    for open in 0..6 {
                        let r = p.open(backlog, open);
                        let t = threshold.max(1);
                        let expect = if backlog == 0 || open >= max.max(1) {
                            None
                        } else if open == 0 {
                            Some(Demand)
                        } else if backlog >= t * open {
                            Some(Threshold)
                        } else {
                            None
                        };
                        assert_eq!(r, expect, "t={threshold} max={max} b={backlog} o={open}");
                    }
                }
            }
        }
    }

    #[test]
    fn takes_work_and_reports_reuse_once_after_idle() {
        let p = policy();
        let t0 = Instant::now();
        let mut a = Association::new(t0);
        assert_eq!(p.next(&a, t0, 1), Next::Take { reused: false });
        a.took();
        a.finished(t0, true);
        assert_eq!(p.next(&a, t0, 5), Next::Take { reused: false });
        a.idle(t0);
        let t1 = t0 + Duration::from_secs(10);
        a.idle(t1);
        assert_eq!(a.idle_since, Some(t0), "idle since the first time");
        assert_eq!(p.next(&a, t1, 1), Next::Take { reused: true });
        a.took();
        assert_eq!(p.next(&a, t1, 1), Next::Take { reused: false });
    }

    #[test]
    fn idle_waits_then_closes() {
        let p = policy();
        let t0 = Instant::now();
        let mut a = Association::new(t0);
        assert_eq!(
            p.next(&a, t0, 0),
            Next::Wait {
                until: t0 + p.idle_timeout
            }
        );
        a.idle(t0);
        let almost = t0 + p.idle_timeout - Duration::from_millis(1);
        assert!(matches!(p.next(&a, almost, 0), Next::Wait { .. }));
        assert_eq!(p.next(&a, t0 + p.idle_timeout, 0), Next::Close(Idle));
        // Work that arrives just in time keeps it.
        assert_eq!(
            p.next(&a, t0 + p.idle_timeout, 1),
            Next::Take { reused: true }
        );
    }

    #[test]
    fn idle_wait_ends_at_lifetime() {
        let p = policy();
        let t0 = Instant::now();
        let mut a = Association::new(t0);
        let late = t0 + p.lifetime - Duration::from_secs(5);
        a.idle(late);
        assert_eq!(
            p.next(&a, late, 0),
            Next::Wait {
                until: t0 + p.lifetime
            }
        );
        assert_eq!(p.next(&a, t0 + p.lifetime, 0), Next::Close(Lifetime));
    }

    #[test]
    fn renegotiates_by_count_and_lifetime() {
        let p = policy();
        let t0 = Instant::now();
        let mut a = Association::new(t0);
        for _ in 0..p.max_messages - 1 {
            a.took();
            a.finished(t0, true);
        }
        assert_eq!(p.next(&a, t0, 1), Next::Take { reused: false });
        a.took();
        assert_eq!(p.next(&a, t0, 1), Next::Renegotiate(Count));
        assert_eq!(p.next(&a, t0, 0), Next::Close(Count));

        let a = Association::new(t0);
        let old = t0 + p.lifetime;
        assert_eq!(
            p.next(&a, old - Duration::from_millis(1), 1),
            Next::Take { reused: false }
        );
        assert_eq!(p.next(&a, old, 1), Next::Renegotiate(Lifetime));
        assert_eq!(p.next(&a, old, 0), Next::Close(Lifetime));
    }

    #[test]
    fn stalls_when_every_transaction_is_refused_for_stall_timeout() {
        let p = policy();
        let t0 = Instant::now();
        let mut a = Association::new(t0);
        a.took();
        a.finished(t0, false);
        let t1 = t0 + Duration::from_secs(30);
        a.took();
        a.finished(t1, false);
        assert_eq!(a.failing_since, Some(t0));
        assert_eq!(p.next(&a, t1, 1), Next::Take { reused: false });
        let t2 = t0 + p.stall_timeout;
        assert_eq!(p.next(&a, t2, 1), Next::Stall);
        // Without work there is nothing to be stalled on.
        assert!(matches!(p.next(&a, t2, 0), Next::Wait { .. }));
        // One success clears it.
        a.took();
        a.finished(t2, true);
        assert_eq!(p.next(&a, t2, 1), Next::Take { reused: false });
        assert_eq!(a.failing_since, None);
    }

    #[test]
    fn stall_wins_over_renegotiation() {
        let p = Policy {
            max_messages: 1,
            ..policy()
        };
        let t0 = Instant::now();
        let mut a = Association::new(t0);
        a.took();
        a.finished(t0, false);
        assert_eq!(p.next(&a, t0, 1), Next::Renegotiate(Count));
        assert_eq!(p.next(&a, t0 + p.stall_timeout, 1), Next::Stall);
    }
}
