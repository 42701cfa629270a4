//! Failure detection and elections on one node — a pure state machine.
//!
//! Every period the driver tells it what this node sees (an [`Observed`]
//! snapshot of raft's metrics, the peers' answers and the replicated
//! state) and the time; it answers with what to do ([`Action`]s, in
//! order). It reads no clock and draws no randomness of its own: the
//! driver passes the time and the jitter in. The rules it keeps:
//! - a node a voter refused for a shorter log stands back from elections
//!   for `leader_gone_after` (it cannot win, and keeps that voter from
//!   getting ahead of it by a term);
//! - a node that owns a group abstains from elections while a voter that
//!   owns nothing is up — unless the cluster has been leaderless for twice
//!   `leader_gone_after` (the state it judged by may be stale);
//! - a candidate that has not won within `down_after` calls another
//!   election after a random pause (split votes);
//! - a voter whose leader has been silent past the lease (plus a jitter,
//!   less when its log is ahead of what it applied) calls one election for
//!   that leader;
//! - a leader that owns a group steps down (stops its heartbeats); if
//!   nobody takes over within three times `leader_gone_after` it leads on,
//!   and tries again after twenty;
//! - a leader finishes a joint configuration that has been committed and
//!   lasted `down_after`, and does nothing else that period;
//! - a leader promotes caught-up learners that are up, one membership
//!   change at a time, and publishes the members' verdicts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::{LogId, ServerState};
use tokio::time::Instant;

use super::{abstains, promotion, reconcile, Thresholds};
use crate::cluster::state::{ClusterState, Command, Member, NodeId};

/// Timings and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// How often the driver ticks (raft's heartbeat interval).
    pub period: Duration,
    /// The silences behind each verdict.
    pub thresholds: Thresholds,
    /// Most voters the cluster has.
    pub max_voters: usize,
}

/// What this node sees at one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// This node.
    pub id: NodeId,
    /// Its raft role.
    pub state: ServerState,
    /// The leader it knows of, if any (itself when it leads).
    pub leader: Option<NodeId>,
    /// The voters, of every configuration while joint.
    pub voters: BTreeSet<NodeId>,
    /// The voter configurations: one when settled, two while joint.
    pub joint: Vec<BTreeSet<NodeId>>,
    /// The log entry of the membership in force.
    pub membership_log: Option<LogId<NodeId>>,
    /// The last entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The last entry in the log.
    pub last_log_index: Option<u64>,
    /// Leading: the last index each replication target has matched.
    pub matched: BTreeMap<NodeId, u64>,
    /// Raft's members (voters and learners).
    pub members: BTreeMap<NodeId, Member>,
    /// The replicated state as applied here.
    pub cluster: ClusterState,
    /// When each peer last answered (and each leader last called).
    pub acks: BTreeMap<NodeId, Instant>,
    /// When a voter last refused this node for a shorter log.
    pub outlogged_at: Option<Instant>,
    /// Wall-clock time in ms since the Unix epoch, for state records.
    pub now_ms: u64,
}

/// What to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Let openraft campaign or not (its runtime `elect` switch).
    Elections {
        /// Campaigns allowed.
        on: bool,
        /// Off because a voter has a longer log (worth a log line).
        outlogged: bool,
    },
    /// The leader has been silent this long: call an election now.
    CallElection {
        /// Since its last answer.
        silent: Duration,
    },
    /// Split votes: after `pause`, if this node is still a candidate with
    /// no leader, call an election. The re-check is the driver's: someone
    /// may win during the pause, and an election would only unseat them.
    CallElectionOffBeat {
        /// The random pause.
        pause: Duration,
    },
    /// Stop heartbeats so that a voter that owns nothing takes over.
    StepDown,
    /// Heartbeats on again: stepping down is over.
    LeadOn {
        /// Set when it ended because nobody took over in this time.
        gave_up_after: Option<Duration>,
    },
    /// This node lost leadership while stepping down: heartbeats on again
    /// for whenever it leads next.
    ResumeHeartbeats,
    /// Replace all voters with these, ending a joint configuration.
    FinishJoint {
        /// The target configuration.
        voters: BTreeSet<NodeId>,
        /// How long the joint configuration has lasted.
        since: Duration,
    },
    /// Make these learners voters.
    Promote(BTreeSet<NodeId>),
    /// Write these to the replicated state, in order, until one fails.
    Publish(Vec<Command>),
}

/// The machine.
#[derive(Debug)]
pub struct Machine {
    s: Settings,
    /// A value in [0, 1), fresh on each call.
    jitter: fn() -> f64,
    /// Since when this node leads.
    leading_since: Option<Instant>,
    /// A joint configuration and when this leader first saw it.
    joint_seen: Option<(Option<LogId<NodeId>>, Instant)>,
    /// Since when this node is a candidate.
    candidate_since: Option<Instant>,
    /// The leader this node followed last.
    followed: Option<NodeId>,
    /// It called an election for that leader's silence already.
    called: bool,
    /// This node does not campaign (stands back, or abstains).
    quiet: bool,
    /// Stepping down as leader, since when.
    stepping: Option<Instant>,
    /// When to step down again if nobody took over last time.
    step_again: Option<Instant>,
    /// When some leader was last known.
    leader_seen: Instant,
    /// The part of the wait for a silent leader that is drawn at random,
    /// so that the voters do not all campaign at once.
    gone_jitter: Duration,
}

impl Machine {
    /// A machine started at `now`, drawing random values from `jitter`.
    pub fn new(s: Settings, now: Instant, jitter: fn() -> f64) -> Machine {
        Machine {
            s,
            jitter,
            leading_since: None,
            joint_seen: None,
            candidate_since: None,
            followed: None,
            called: false,
            quiet: false,
            stepping: None,
            step_again: None,
            leader_seen: now,
            gone_jitter: s.period.mul_f64(jitter()),
        }
    }

    /// One period: what this node does about what it sees at `now`.
    pub fn tick(&mut self, o: &Observed, now: Instant) -> Vec<Action> {
        let t = self.s.thresholds;
        let mut out = Vec::new();
        // Outlogged recently: no campaigns of ours, and none of openraft's
        // (its election timer is fixed per process, so this node would
        // otherwise go first, and lose, in every term).
        let back = o
            .outlogged_at
            .is_some_and(|at| now.saturating_duration_since(at) < t.leader_gone_after);
        if o.leader.is_some() {
            self.leader_seen = now;
        }
        // An owner leaves campaigns to a voter that owns nothing — unless
        // the cluster has been leaderless a while (the state it judged by
        // may be stale): then anyone campaigns.
        let abstain = abstains(o.id, &o.cluster, &o.voters)
            && now.saturating_duration_since(self.leader_seen) < t.leader_gone_after * 2;
        if (back || abstain) != self.quiet {
            self.quiet = back || abstain;
            out.push(Action::Elections {
                on: !self.quiet,
                outlogged: back,
            });
        }
        self.split_vote(o, now, &mut out);
        if o.state == ServerState::Follower {
            self.follow(o, now, &mut out);
        }
        if o.state == ServerState::Leader {
            self.lead(o, abstain, now, &mut out);
        } else {
            self.leading_since = None;
            if self.stepping.take().is_some() {
                out.push(Action::ResumeHeartbeats);
            }
        }
        out
    }

    /// openraft draws a node's election timeout once per process and
    /// checks it on a tick: two candidates whose timeouts land on the same
    /// tick split the vote in every term, for ever; and a voter that
    /// refused a shorter log keeps its old term, so the candidates of one
    /// term block each other. A candidate that has not won within an
    /// election timeout calls another election after a random pause of up
    /// to three heartbeats.
    fn split_vote(&mut self, o: &Observed, now: Instant, out: &mut Vec<Action>) {
        if self.quiet || o.state != ServerState::Candidate {
            self.candidate_since = None;
            return;
        }
        let since = *self.candidate_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.s.thresholds.down_after {
            self.candidate_since = None;
            let pause = (self.s.period * 3).mul_f64((self.jitter)());
            out.push(Action::CallElectionOffBeat { pause });
        }
    }

    /// openraft waits out its lease and then a random election timeout
    /// more before it campaigns (1.5–2 s by default); the other voters
    /// grant votes as soon as the lease is over. A voter that finds its
    /// leader silent past the lease (plus a heartbeat and a jitter, so one
    /// goes first) campaigns then: a dead leader costs one lease, not two.
    fn follow(&mut self, o: &Observed, now: Instant, out: &mut Vec<Action>) {
        let leader = o.leader.filter(|l| *l != o.id);
        if leader != self.followed {
            (self.followed, self.called) = (leader, false);
        }
        let voter = o.voters.contains(&o.id);
        let heard = self.followed.and_then(|l| o.acks.get(&l).copied());
        // A follower holding entries past what it has applied probably has
        // the longest log, which the others will insist on; a shorter log
        // that campaigns first only costs a round.
        let ahead = o.last_log_index > o.last_applied.map(|l| l.index);
        let wait = self.s.thresholds.leader_gone_after
            + if ahead {
                self.gone_jitter / 2
            } else {
                self.gone_jitter + self.s.period
            };
        if let Some(at) = heard.filter(|_| voter && !self.called && !self.quiet) {
            let silent = now.saturating_duration_since(at);
            if silent >= wait {
                self.called = true;
                self.gone_jitter = self.s.period.mul_f64((self.jitter)());
                out.push(Action::CallElection { silent });
            }
        }
    }

    /// A leader steps down while it owns a group; otherwise it finishes a
    /// stale joint configuration, or promotes learners and publishes the
    /// members' verdicts.
    fn lead(&mut self, o: &Observed, abstain: bool, now: Instant, out: &mut Vec<Action>) {
        let t = self.s.thresholds;
        let since = *self.leading_since.get_or_insert(now);
        // A leader that owns a group steps down: without its heartbeats a
        // voter that owns nothing campaigns after the lease (openraft 0.9
        // has no leadership transfer). If nobody has after a while, it
        // leads on and tries again later.
        if abstain && self.stepping.is_none() && self.step_again.is_none_or(|at| now >= at) {
            out.push(Action::StepDown);
            self.stepping = Some(now);
        }
        let over = |at: &Instant| now - *at > t.leader_gone_after * 3 || !abstain;
        if let Some(at) = self.stepping.filter(over) {
            out.push(Action::LeadOn {
                gave_up_after: abstain.then(|| now - at),
            });
            self.stepping = None;
            self.step_again = Some(now + t.leader_gone_after * 20);
        }
        if self.stepping.is_some() {
            // Quiet: any write would refresh the followers' leader lease
            // (and without heartbeats they would all look suspect).
            return;
        }
        // One membership change at a time; joint phases finish first.
        let settled = o.joint.len() == 1;
        // A change cut off between its two steps (its leader lost office)
        // leaves a joint configuration that openraft does not finish by
        // itself. Once it has lasted long enough that nobody here can
        // still be in the middle of it, this leader finishes it.
        let log_id = o.membership_log;
        self.joint_seen = match self.joint_seen.take() {
            Some((seen, at)) if !settled && seen == log_id => Some((seen, at)),
            _ if !settled => Some((log_id, now)),
            _ => None,
        };
        let committed = log_id <= o.last_applied;
        let due = |(_, at): &(_, Instant)| committed && now - *at >= t.down_after;
        if let Some((_, at)) = self.joint_seen.filter(due) {
            out.push(Action::FinishJoint {
                voters: o.joint.last().cloned().unwrap_or_default(),
                since: now - at,
            });
            return;
        }
        // Only a non-voter that has caught up may vote: a lagging one would
        // weaken the quorum until it catches up.
        let last = o.last_log_index.unwrap_or(0);
        let caught_up: BTreeMap<NodeId, Member> = o
            .members
            .iter()
            .filter(|(id, _)| o.matched.get(id).is_some_and(|i| i + 1 >= last))
            .map(|(id, n)| (*id, n.clone()))
            .collect();
        let voters: BTreeMap<NodeId, ()> = o.voters.iter().map(|id| (*id, ())).collect();
        let promote = promotion(&voters, &caught_up, &o.cluster, self.s.max_voters);
        if settled && !promote.is_empty() {
            out.push(Action::Promote(promote));
        }
        let silence: BTreeMap<NodeId, Duration> = o
            .acks
            .iter()
            .map(|(id, at)| {
                // An answer from before this term's leadership says nothing
                // about now — except from the leader this node followed:
                // its silence is why this node leads, so it counts in full.
                let from = if Some(*id) == self.followed {
                    *at
                } else {
                    (*at).max(since)
                };
                (*id, now.saturating_duration_since(from))
            })
            .collect();
        let commands = reconcile(
            o.id,
            &o.members,
            &o.cluster,
            &silence,
            now - since,
            t,
            o.now_ms,
        );
        if !commands.is_empty() {
            out.push(Action::Publish(commands));
        }
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
