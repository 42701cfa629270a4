//! One group on one node, the owner's side — a pure state machine.
//!
//! It is told what the replicated state says (is the group ours under a
//! live epoch?), how long its lease holds, and how each resource
//! operation ended; it answers with what to do: start, stop, check,
//! report, fence. The rules it keeps:
//! - resources run only while the lease holds for longer than the stop
//!   margin; when the lease gets that close to its end they are stopped
//!   hard, before it can run out (the next owner may start after it);
//! - before starting, the owner claims the resources: it makes sure no
//!   other host still holds them (a frozen former owner keeps its address
//!   until the kernel's lifetime for it runs out). A claim that finds them
//!   held is tried again shortly; held for longer than the start timeout,
//!   the group fails here and the leader moves it. A claim has no effect,
//!   so a stop or a lost lease overtakes it;
//! - one operation at a time, each with a deadline the driver enforces —
//!   except that a check in flight never holds up a stop: the stop goes
//!   out at once and the check's late result is ignored;
//! - a failed start or check restarts the group in place, at most
//!   `max_restarts` times within `restart_window`; beyond that the owner
//!   stops, reports the group failed, and the leader moves it;
//! - a stop that fails or misses its deadline fences the node for the
//!   group, and is tried again until it succeeds (the address's lifetime
//!   in the kernel is the backstop meanwhile); then the fence is lifted;
//! - a revoked epoch is stopped at once (its lease is no longer renewed,
//!   and the next owner may start when it runs out) and reported offline,
//!   which releases it;
//! - a group the leader asks to hand over (draining) is stopped gracefully
//!   — new clients refused, open sessions finished — while its lease stays
//!   live and renewed, then released; should the lease get short during
//!   the drain, the drain is hurried to a hard stop.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::state::groups::GroupStatus;

/// Timings and limits.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Period of health checks while online.
    pub check_interval: Duration,
    /// Deadline for starting the resources.
    pub start_timeout: Duration,
    /// Restarts allowed within `restart_window`.
    pub max_restarts: u32,
    /// The window restarts are counted in.
    pub restart_window: Duration,
    /// Stop this long before the lease could run out.
    pub stop_margin: Duration,
    /// Pause before claiming again resources found held elsewhere.
    pub claim_retry: Duration,
    /// Pause before trying again a stop that failed.
    pub stop_retry: Duration,
}

/// Where the group is on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not ours.
    Idle,
    /// Ours; waiting for the lease.
    Waiting,
    /// Resources starting.
    Starting,
    /// Resources running.
    Online,
    /// Resources stopping; what comes after.
    Stopping(After),
    /// Stopped for good under this epoch (released or failed).
    Done,
    /// A stop failed: fenced for this group, stopping again until done.
    Fenced,
}

/// What follows a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// The epoch is over for us: report offline (release it).
    Release,
    /// The lease ran short: wait to hold it again.
    Wait,
    /// A failure: start again in place.
    Restart,
    /// Too many failures: report failed.
    Fail,
}

/// An operation on the group's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Make sure no other host holds them.
    Claim,
    /// Start them all, in order.
    Start,
    /// Stop them all (drained first, if graceful), the address first.
    Stop,
    /// Check their health.
    Check,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The replicated state: is the group ours, under which epoch, and is
    /// that epoch live (neither revoked nor released)?
    View {
        /// This node owns it.
        ours: bool,
        /// The current epoch.
        epoch: u64,
        /// Not revoked or released.
        live: bool,
        /// The leader asked the owner to hand the group over.
        draining: bool,
    },
    /// The lease holds until then (None: no majority).
    Lease(Option<Instant>),
    /// An operation ended: Ok, or why not (failed, timed out, panicked).
    Done(Op, Result<(), String>),
    /// Time passed (at least until `next_wake`).
    Tick,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the resources; give up at `deadline`.
    Start {
        /// Deadline.
        deadline: Instant,
    },
    /// Stop them; gracefully (drain) or at once.
    Stop {
        /// Drain open sessions first.
        graceful: bool,
    },
    /// Make sure no other host holds them (no effect of its own).
    Claim,
    /// Check them.
    Check,
    /// A graceful stop in flight must end now: the lease got short.
    Hurry,
    /// Tell the leader: the status of the group under this epoch.
    Report(u64, GroupStatus, String),
    /// Ask the leader to fence this node for the group.
    Fence(String),
    /// The stop that failed has succeeded: lift the fence.
    Unfence,
}

/// The machine.
#[derive(Debug)]
pub struct Machine {
    s: Settings,
    phase: Phase,
    epoch: u64,
    /// The epoch the current phase belongs to — what reports speak for. It
    /// lags `epoch` while a stop of an older epoch is still in flight.
    held: u64,
    ours: bool,
    live: bool,
    draining: bool,
    lease: Option<Instant>,
    busy: Option<Op>,
    /// The stop in flight drains (true until hurried).
    draining_stop: bool,
    next_check: Option<Instant>,
    restarts: VecDeque<Instant>,
    /// Why the current stop happened, for the report after it.
    why: String,
    /// A claim found the resources free just now: good for the start that
    /// follows it at once, never for a later one.
    claimed: bool,
    /// Since when claims keep finding them held.
    held_elsewhere: Option<Instant>,
    /// When to claim (fenced: stop) again.
    retry_at: Option<Instant>,
}

impl Machine {
    /// A machine for a group that is not (yet) ours.
    pub fn new(s: Settings) -> Machine {
        Machine {
            s,
            phase: Phase::Idle,
            epoch: 0,
            held: 0,
            ours: false,
            live: false,
            draining: false,
            lease: None,
            busy: None,
            draining_stop: false,
            next_check: None,
            restarts: VecDeque::new(),
            why: String::new(),
            claimed: false,
            held_elsewhere: None,
            retry_at: None,
        }
    }

    /// Where it is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether an operation is in flight.
    pub fn busy(&self) -> bool {
        self.busy.is_some()
    }

    /// The epoch to keep renewing grants for, if any.
    pub fn renewing(&self) -> Option<u64> {
        let active = matches!(
            self.phase,
            Phase::Waiting
                | Phase::Starting
                | Phase::Online
                | Phase::Stopping(After::Restart | After::Wait | After::Release)
        );
        (active && self.ours && self.live).then_some(self.epoch)
    }

    /// When the driver should send a `Tick` next.
    pub fn next_wake(&self) -> Option<Instant> {
        let running = matches!(self.phase, Phase::Starting | Phase::Online);
        let lease_end = self
            .lease
            .filter(|_| running || self.draining_stop)
            .map(|l| l.checked_sub(self.s.stop_margin).unwrap_or(l));
        let check = self.next_check.filter(|_| self.phase == Phase::Online);
        let retry = self
            .retry_at
            .filter(|_| matches!(self.phase, Phase::Waiting | Phase::Fenced));
        [lease_end, check, retry].into_iter().flatten().min()
    }

    fn lease_ok(&self, now: Instant) -> bool {
        self.lease.is_some_and(|l| l > now + self.s.stop_margin)
    }

    /// Feed one event; returns what to do, in order.
    pub fn on(&mut self, ev: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::View {
                ours,
                epoch,
                live,
                draining,
            } => {
                if epoch != self.epoch {
                    // A new epoch starts from scratch (a stop in flight
                    // still finishes first).
                    self.epoch = epoch;
                    self.restarts.clear();
                    // Fenced stays fenced: its stop is still to be done.
                    if self.phase == Phase::Done {
                        self.phase = Phase::Idle;
                    }
                    self.lease = None;
                    self.held_elsewhere = None;
                }
                self.ours = ours;
                self.live = live;
                self.draining = draining;
            }
            Event::Lease(until) => self.lease = until,
            // A check overtaken by a stop ends unheard.
            Event::Done(op, result) if self.busy == Some(op) => {
                self.busy = None;
                self.draining_stop = false;
                self.finished(op, result, now, &mut out);
            }
            Event::Done(..) => {}
            Event::Tick => {}
        }
        self.step(now, &mut out);
        out
    }

    fn finished(
        &mut self,
        op: Op,
        result: Result<(), String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        match (op, result) {
            (Op::Claim, Ok(())) => {
                self.claimed = true;
                self.held_elsewhere = None;
            }
            (Op::Claim, Err(why)) => self.held(why, now, out),
            (Op::Start, Ok(())) if self.phase == Phase::Starting => {
                self.phase = Phase::Online;
                self.next_check = Some(now + self.s.check_interval);
                out.push(Action::Report(
                    self.held,
                    GroupStatus::Online,
                    "resources started".into(),
                ));
            }
            (Op::Start | Op::Check, Err(why))
                if matches!(self.phase, Phase::Starting | Phase::Online) =>
            {
                self.failure(why, now, out);
            }
            (Op::Check, Ok(())) => self.next_check = Some(now + self.s.check_interval),
            (Op::Stop, Ok(())) => {
                // A newer epoch that came during the stop starts afresh.
                let over = if self.held == self.epoch {
                    Phase::Done
                } else {
                    Phase::Idle
                };
                if self.phase == Phase::Fenced {
                    self.retry_at = None;
                    out.push(Action::Unfence);
                    if over == Phase::Done && self.ours && self.live {
                        let why = "stopped after a failed stop".to_string();
                        out.push(Action::Report(self.held, GroupStatus::Offline, why));
                    }
                    self.phase = over;
                }
                if let Phase::Stopping(after) = self.phase {
                    self.phase = match after {
                        After::Release => {
                            out.push(Action::Report(
                                self.held,
                                GroupStatus::Offline,
                                self.why.clone(),
                            ));
                            over
                        }
                        After::Fail => {
                            out.push(Action::Report(
                                self.held,
                                GroupStatus::Failed,
                                self.why.clone(),
                            ));
                            over
                        }
                        After::Wait | After::Restart => Phase::Waiting,
                    };
                }
            }
            (Op::Stop, Err(why)) => {
                // Fenced once; later failures only try again.
                if self.phase != Phase::Fenced {
                    out.push(Action::Fence(format!("stop failed: {why}")));
                }
                self.phase = Phase::Fenced;
                self.retry_at = Some(now + self.s.stop_retry);
            }
            // A start that ended after we decided to stop: the stop follows.
            _ => {}
        }
    }

    /// A claim found the resources held by another host.
    fn held(&mut self, why: String, now: Instant, out: &mut Vec<Action>) {
        if self.phase != Phase::Waiting {
            return;
        }
        let since = *self.held_elsewhere.get_or_insert(now);
        if now.duration_since(since) >= self.s.start_timeout {
            self.held_elsewhere = None;
            self.phase = Phase::Done;
            let why = format!("{why}, for longer than the start timeout");
            out.push(Action::Report(self.held, GroupStatus::Failed, why));
            return;
        }
        if since == now {
            // Once per wait: the operator sees why it is not online yet.
            let why = format!("waiting to claim: {why}");
            out.push(Action::Report(self.held, GroupStatus::Starting, why));
        }
        self.retry_at = Some(now + self.s.claim_retry);
    }

    fn failure(&mut self, why: String, now: Instant, out: &mut Vec<Action>) {
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.s.restart_window)
        {
            self.restarts.pop_front();
        }
        let after = if self.restarts.len() < self.s.max_restarts as usize {
            self.restarts.push_back(now);
            After::Restart
        } else {
            After::Fail
        };
        let n = self.restarts.len();
        self.why = match after {
            After::Restart => format!(
                "{why}; restarting in place ({n} of {})",
                self.s.max_restarts
            ),
            _ => format!("{why}; restarts exhausted"),
        };
        out.push(Action::Report(
            self.held,
            GroupStatus::Stopping,
            self.why.clone(),
        ));
        self.phase = Phase::Stopping(after);
        out.push(Action::Stop { graceful: false });
        self.busy = Some(Op::Stop);
    }

    /// Move on from where we are, if no operation is in flight.
    fn step(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.draining_stop && !(self.ours && self.live && self.lease_ok(now)) {
            // The drain may not outlast the lease: the next owner could
            // start once it runs out.
            self.draining_stop = false;
            out.push(Action::Hurry);
        }
        let mine = self.ours && self.live;
        let must_stop = !mine || !self.lease_ok(now);
        if self.busy == Some(Op::Check) && self.phase == Phase::Online && must_stop {
            self.busy = None;
        }
        if self.busy == Some(Op::Claim) && (must_stop || self.draining) {
            self.busy = None;
        }
        // A claim is good for the start that follows it in this very step.
        let claimed = std::mem::take(&mut self.claimed);
        if self.busy.is_some() {
            return;
        }
        let due = |t: Option<Instant>| t.is_none_or(|t| now >= t);
        match self.phase {
            Phase::Fenced if due(self.retry_at) => {
                self.busy = Some(Op::Stop);
                out.push(Action::Stop { graceful: false });
                return;
            }
            Phase::Idle if mine && !self.draining => {
                self.phase = Phase::Waiting;
                self.held = self.epoch;
            }
            Phase::Waiting if !mine || self.draining => {
                // Never started under this epoch: releasing needs no stop.
                self.held_elsewhere = None;
                self.phase = if self.ours {
                    out.push(Action::Report(
                        self.held,
                        GroupStatus::Offline,
                        "not started".into(),
                    ));
                    Phase::Done
                } else {
                    Phase::Idle
                };
                return;
            }
            Phase::Starting | Phase::Online if !mine => {
                // Revoked: nobody renews the lease any more, so no drain.
                self.why = "the epoch was taken back".into();
                out.push(Action::Report(
                    self.held,
                    GroupStatus::Stopping,
                    self.why.clone(),
                ));
                self.stop(After::Release, false, out);
                return;
            }
            Phase::Starting | Phase::Online if !self.lease_ok(now) => {
                self.why = "lease about to run out".into();
                self.stop(After::Wait, false, out);
                return;
            }
            Phase::Starting | Phase::Online if self.draining => {
                self.why = "handing over: drained".into();
                let why = "handing over: draining open sessions";
                out.push(Action::Report(self.held, GroupStatus::Stopping, why.into()));
                self.stop(After::Release, true, out);
                return;
            }
            Phase::Online if self.next_check.is_some_and(|t| now >= t) => {
                self.next_check = None;
                self.busy = Some(Op::Check);
                out.push(Action::Check);
                return;
            }
            _ => {}
        }
        if !(self.phase == Phase::Waiting && mine && self.lease_ok(now)) {
            return;
        }
        if !claimed {
            if due(self.retry_at) {
                self.retry_at = None;
                self.busy = Some(Op::Claim);
                out.push(Action::Claim);
            }
            return;
        }
        self.phase = Phase::Starting;
        self.held = self.epoch;
        self.busy = Some(Op::Start);
        let lease_end = self.lease.map_or(now, |l| l - self.s.stop_margin);
        let deadline = (now + self.s.start_timeout).min(lease_end);
        out.push(Action::Report(
            self.held,
            GroupStatus::Starting,
            "lease held".into(),
        ));
        out.push(Action::Start { deadline });
    }

    fn stop(&mut self, after: After, graceful: bool, out: &mut Vec<Action>) {
        self.phase = Phase::Stopping(after);
        self.busy = Some(Op::Stop);
        self.draining_stop = graceful;
        out.push(Action::Stop { graceful });
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
