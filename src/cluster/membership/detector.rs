//! Failure detection. The leader hears from every member on each
//! heartbeat; a member it has not heard from for `suspect_after` is
//! suspect, for `down_after` down. The leader publishes changes in the
//! replicated state, so every node (and the admin interface) reads the
//! same verdicts. It also records members that raft knows but the state
//! does not (the bootstrap node admits itself without a join).
//!
//! Every node also steers elections here, where openraft alone would be
//! slow or stuck (split votes, a silent leader, an owner leading). The
//! decisions are a pure [`Machine`]; [`run`] only shows it what this node
//! sees each period and carries out its answer through openraft.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::time::Duration;

use openraft::{ChangeMembers, Raft, RaftMetrics, ServerState};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::raft::network::{Acks, Signals};
use crate::cluster::raft::store::ClusterView;
use crate::cluster::state::groups::delivery_node;
use crate::cluster::state::{ClusterState, Command, Member, NodeId, NodeState, TypeConfig};

pub mod machine;

pub use machine::{Action, Machine, Observed, Settings};

/// How long silence may last before each verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Silence before a member is suspect.
    pub suspect_after: Duration,
    /// Silence before a member is down.
    pub down_after: Duration,
    /// Silence of its leader before a follower calls an election: just past
    /// raft's leader lease, when the other voters will grant votes again.
    pub leader_gone_after: Duration,
}

/// The verdict on a member silent for `silence`.
pub fn judge(silence: Duration, t: Thresholds) -> NodeState {
    if silence >= t.down_after {
        NodeState::Down
    } else if silence >= t.suspect_after {
        NodeState::Suspect
    } else {
        NodeState::Up
    }
}

/// Commands that bring the replicated state in line with what the leader
/// `me` sees: raft's `members` with their `silence` (absent: never heard
/// from since this leader took over, counted from then).
pub fn reconcile(
    me: NodeId,
    members: &BTreeMap<NodeId, Member>,
    state: &ClusterState,
    silence: &BTreeMap<NodeId, Duration>,
    since_leading: Duration,
    t: Thresholds,
    now_ms: u64,
) -> Vec<Command> {
    let mut out = Vec::new();
    for (&id, member) in members {
        let verdict = if id == me {
            NodeState::Up
        } else {
            judge(silence.get(&id).copied().unwrap_or(since_leading), t)
        };
        match state.members.get(&id) {
            None => {
                out.push(Command::Upsert {
                    id,
                    member: member.clone(),
                });
                if verdict != NodeState::Up {
                    out.push(Command::SetState {
                        id,
                        state: verdict,
                        at_ms: now_ms,
                        from: Some(NodeState::Up),
                    });
                }
            }
            // Left is not a failure: silence is expected, and only the
            // node's own rejoin marks it up again.
            Some(known) if known.state == NodeState::Left => {}
            Some(known) if known.state != verdict => out.push(Command::SetState {
                id,
                state: verdict,
                at_ms: now_ms,
                from: Some(known.state),
            }),
            Some(_) => {}
        }
    }
    out
}

/// Whether node `me` should leave leading to others: it holds a live group
/// and a voter that is up holds none. A leader that owns a group makes its
/// own failure cost an election on top of the failover; a leader that owns
/// nothing makes it a plain failover (and its own failure costs clients
/// nothing). Delivery groups do not count: every member holds its own.
pub fn abstains(me: NodeId, state: &ClusterState, voters: &BTreeSet<NodeId>) -> bool {
    let holds = |id: NodeId| {
        state.groups.iter().any(|(name, g)| {
            delivery_node(name).is_none() && g.owner == Some(id) && !g.revoked && !g.released
        })
    };
    let up = |id: &NodeId| {
        state
            .members
            .get(id)
            .is_some_and(|m| m.state == NodeState::Up)
    };
    holds(me) && voters.iter().any(|v| *v != me && up(v) && !holds(*v))
}

/// Non-voters to promote, as many as the voter set has room for: the
/// oldest incarnations among the members published up. This makes joined
/// learners voters (in one membership change, however many joined), and
/// fills a slot freed by an eviction.
pub fn promotion(
    voters: &BTreeMap<NodeId, ()>,
    members: &BTreeMap<NodeId, Member>,
    state: &ClusterState,
    max_voters: usize,
) -> BTreeSet<NodeId> {
    members
        .keys()
        .filter(|id| !voters.contains_key(id))
        .filter(|id| {
            state
                .members
                .get(id)
                .is_some_and(|m| m.state == NodeState::Up)
        })
        .take(max_voters.saturating_sub(voters.len()))
        .copied()
        .collect()
}

/// Run detection on this node until `cancel`: every `period`, show the
/// [`Machine`] what this node sees and carry out what it decides.
pub async fn run(
    raft: Raft<TypeConfig>,
    view: watch::Receiver<ClusterView>,
    signals: Signals,
    period: Duration,
    t: Thresholds,
    max_voters: usize,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let settings = Settings {
        period,
        thresholds: t,
        max_voters,
    };
    let mut machine = Machine::new(settings, Instant::now(), crate::backoff::jitter);
    loop {
        tokio::select! {
            // A leaving node must not campaign again (nor re-enable its
            // elections): the cancel wins over a tick that is also ready.
            biased;
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let m = raft.metrics().borrow().clone();
        let seen = observe(&m, &view, &signals);
        for action in machine.tick(&seen, Instant::now()) {
            if carry_out(&raft, action, &seen, &cancel).await.is_break() {
                return;
            }
        }
    }
}

/// What this node sees now, for the machine.
fn observe(
    m: &RaftMetrics<NodeId, Member>,
    view: &watch::Receiver<ClusterView>,
    signals: &Signals,
) -> Observed {
    let membership = m.membership_config.membership();
    let matched = m
        .replication
        .iter()
        .flatten()
        .filter_map(|(id, l)| Some((*id, l.as_ref()?.index)))
        .collect();
    Observed {
        id: m.id,
        state: m.state,
        leader: m.current_leader,
        voters: membership.voter_ids().collect(),
        joint: membership.get_joint_config().clone(),
        membership_log: *m.membership_config.log_id(),
        last_applied: m.last_applied,
        last_log_index: m.last_log_index,
        matched,
        members: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        cluster: view.borrow().state.clone(),
        acks: lock(&signals.acks)
            .iter()
            .map(|(id, at)| (*id, *at))
            .collect(),
        outlogged_at: *signals.outlogged.lock().unwrap_or_else(|e| e.into_inner()),
        now_ms: crate::clock::now_ms(),
    }
}

/// Carry out one action with openraft. Breaks when `cancel` ends a pause.
/// Once cancelled, this node neither campaigns nor switches elections or
/// heartbeats back on; what it started as a leader it finishes.
async fn carry_out(
    raft: &Raft<TypeConfig>,
    action: Action,
    seen: &Observed,
    cancel: &CancellationToken,
) -> ControlFlow<()> {
    match action {
        Action::Elections { on, outlogged } => {
            if !cancel.is_cancelled() {
                raft.runtime_config().elect(on);
                if outlogged {
                    tracing::info!("a voter has a longer log: standing back from elections");
                }
            }
        }
        Action::CallElectionOffBeat { pause } => {
            tokio::select! {
                _ = cancel.cancelled() => return ControlFlow::Break(()),
                _ = tokio::time::sleep(pause) => {}
            }
            // Someone may have won meanwhile: then an election would only
            // unseat them.
            let now = raft.metrics().borrow().clone();
            let still = now.state == ServerState::Candidate && now.current_leader.is_none();
            if still && !cancel.is_cancelled() {
                tracing::info!(
                    term = now.current_term,
                    "split votes: calling an election off-beat"
                );
                let _ = raft.trigger().elect().await;
            }
        }
        Action::CallElection { silent } => {
            if !cancel.is_cancelled() {
                tracing::info!(silent = ?silent, "the leader is silent: calling an election");
                let _ = raft.trigger().elect().await;
            }
        }
        Action::ResumeHeartbeats => {
            if !cancel.is_cancelled() {
                raft.runtime_config().heartbeat(true);
            }
        }
        Action::StepDown => {
            tracing::info!(
                "leading while owning a group: leaving leadership to a voter that owns none"
            );
            raft.runtime_config().heartbeat(false);
        }
        Action::LeadOn { gave_up_after } => {
            if let Some(since) = gave_up_after {
                tracing::warn!(since = ?since, "nobody took leadership over; leading on");
            }
            raft.runtime_config().heartbeat(true);
        }
        Action::FinishJoint { voters, since } => {
            tracing::info!(voters = ?voters, since = ?since, "finishing an interrupted membership change");
            if let Err(e) = raft
                .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
                .await
            {
                tracing::debug!(error = %e, "could not finish the membership change yet");
            }
        }
        Action::Promote(ids) => {
            let names: Vec<&str> = ids.iter().map(|id| name(seen, *id)).collect();
            match raft
                .change_membership(ChangeMembers::AddVoterIds(ids), true)
                .await
            {
                Ok(_) => tracing::info!(nodes = ?names, "promoted to voter"),
                Err(e) => tracing::debug!(error = %e, "promotion not possible now"),
            }
        }
        Action::Publish(commands) => {
            for c in commands {
                let change = match &c {
                    Command::SetState { id, state, .. } => Some((*id, *state)),
                    _ => None,
                };
                if let Err(e) = raft.client_write(c).await {
                    tracing::debug!(error = %e, "could not publish member state");
                    break;
                }
                // Logged once committed: what the log says, everyone can read.
                if let Some((id, state)) = change {
                    tracing::info!(node = name(seen, id), state = ?state, "member state changed");
                }
            }
        }
    }
    ControlFlow::Continue(())
}

/// A member's name, for logs.
fn name(seen: &Observed, id: NodeId) -> &str {
    seen.members.get(&id).map_or("?", |m| m.name.as_str())
}

fn lock(acks: &Acks) -> std::sync::MutexGuard<'_, std::collections::HashMap<NodeId, Instant>> {
    acks.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::{MemberState, Role};

    const T: Thresholds = Thresholds {
        suspect_after: Duration::from_millis(300),
        down_after: Duration::from_millis(1000),
        leader_gone_after: Duration::from_millis(2100),
    };

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            addr: "127.0.0.1:7400".into(),
            role: Role::Member,
        }
    }

    fn state(entries: &[(NodeId, NodeState)]) -> ClusterState {
        let mut s = ClusterState::default();
        for &(id, st) in entries {
            s.members.insert(
                id,
                MemberState {
                    member: member(&format!("n{id}")),
                    state: st,
                    since_ms: 0,
                },
            );
        }
        s
    }

    #[test]
    fn silence_maps_to_verdicts_at_the_thresholds() {
        assert_eq!(judge(Duration::from_millis(299), T), NodeState::Up);
        assert_eq!(judge(Duration::from_millis(300), T), NodeState::Suspect);
        assert_eq!(judge(Duration::from_millis(999), T), NodeState::Suspect);
        assert_eq!(judge(Duration::from_millis(1000), T), NodeState::Down);
    }

    #[test]
    fn only_changes_are_published_and_the_leader_is_up() {
        let members: BTreeMap<NodeId, Member> = [1, 2, 3]
            .iter()
            .map(|&i| (i, member(&format!("n{i}"))))
            .collect();
        let st = state(&[(1, NodeState::Up), (2, NodeState::Up), (3, NodeState::Up)]);
        let silence = BTreeMap::from([(2, Duration::from_millis(50)), (3, Duration::from_secs(2))]);
        let out = reconcile(1, &members, &st, &silence, Duration::ZERO, T, 7);
        assert_eq!(
            out,
            vec![Command::SetState {
                id: 3,
                state: NodeState::Down,
                at_ms: 7,
                from: Some(NodeState::Up),
            }]
        );
    }

    #[test]
    fn a_node_never_heard_from_counts_from_the_start_of_leadership() {
        let members: BTreeMap<NodeId, Member> = [1, 2]
            .iter()
            .map(|&i| (i, member(&format!("n{i}"))))
            .collect();
        let st = state(&[(1, NodeState::Up), (2, NodeState::Up)]);
        let fresh = reconcile(
            1,
            &members,
            &st,
            &BTreeMap::new(),
            Duration::from_millis(100),
            T,
            0,
        );
        assert!(fresh.is_empty());
        let late = reconcile(
            1,
            &members,
            &st,
            &BTreeMap::new(),
            Duration::from_millis(400),
            T,
            0,
        );
        assert_eq!(
            late,
            vec![Command::SetState {
                id: 2,
                state: NodeState::Suspect,
                at_ms: 0,
                from: Some(NodeState::Up),
            }]
        );
    }

    #[test]
    fn members_raft_knows_but_the_state_does_not_are_recorded() {
        let members = BTreeMap::from([(1, member("boot"))]);
        let out = reconcile(
            1,
            &members,
            &ClusterState::default(),
            &BTreeMap::new(),
            Duration::ZERO,
            T,
            0,
        );
        assert_eq!(
            out,
            vec![Command::Upsert {
                id: 1,
                member: member("boot")
            }]
        );
    }

    #[test]
    fn a_free_voter_slot_goes_to_the_oldest_member_that_is_up() {
        let members: BTreeMap<NodeId, Member> = [1, 2, 3, 4]
            .iter()
            .map(|&i| (i, member(&format!("n{i}"))))
            .collect();
        let st = state(&[
            (1, NodeState::Up),
            (2, NodeState::Up),
            (3, NodeState::Down),
            (4, NodeState::Up),
        ]);
        let voters: BTreeMap<NodeId, ()> = [(1, ()), (2, ())].into();
        let none = BTreeSet::new();
        assert_eq!(promotion(&voters, &members, &st, 3), BTreeSet::from([4]));
        assert_eq!(promotion(&voters, &members, &st, 2), none);
        let all: BTreeMap<NodeId, ()> = [(1, ()), (2, ()), (3, ()), (4, ())].into();
        assert_eq!(promotion(&all, &members, &st, 5), none);
    }

    #[test]
    fn learners_that_joined_together_are_promoted_together_up_to_the_limit() {
        let members: BTreeMap<NodeId, Member> =
            (1..=6).map(|i| (i, member(&format!("n{i}")))).collect();
        let st = state(&(1..=6).map(|i| (i, NodeState::Up)).collect::<Vec<_>>());
        let voters: BTreeMap<NodeId, ()> = [(1, ())].into();
        assert_eq!(
            promotion(&voters, &members, &st, 5),
            BTreeSet::from([2, 3, 4, 5])
        );
    }

    #[test]
    fn a_member_that_comes_back_is_up_again() {
        let members: BTreeMap<NodeId, Member> = [1, 2]
            .iter()
            .map(|&i| (i, member(&format!("n{i}"))))
            .collect();
        let st = state(&[(1, NodeState::Up), (2, NodeState::Down)]);
        let silence = BTreeMap::from([(2, Duration::from_millis(10))]);
        let out = reconcile(1, &members, &st, &silence, Duration::from_secs(9), T, 5);
        assert_eq!(
            out,
            vec![Command::SetState {
                id: 2,
                state: NodeState::Up,
                at_ms: 5,
                from: Some(NodeState::Down),
            }]
        );
    }

    #[test]
    fn a_member_that_left_stays_left_silent_or_not() {
        let members: BTreeMap<NodeId, Member> = [1, 2, 3]
            .iter()
            .map(|&i| (i, member(&format!("n{i}"))))
            .collect();
        let st = state(&[
            (1, NodeState::Up),
            (2, NodeState::Left),
            (3, NodeState::Left),
        ]);
        // 2 is long silent (stopped), 3 still answers (shutting down).
        let silence = BTreeMap::from([(2, Duration::from_secs(60)), (3, Duration::ZERO)]);
        let out = reconcile(1, &members, &st, &silence, Duration::from_secs(60), T, 5);
        assert_eq!(out, vec![]);
    }

    #[test]
    fn an_owner_leaves_leading_to_a_voter_that_owns_nothing() {
        use crate::cluster::state::groups::GroupState;
        let up = NodeState::Up;
        let mut s = state(&[(1, up), (2, up), (3, up)]);
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        let held = |owner| GroupState {
            owner: Some(owner),
            epoch: 1,
            ..Default::default()
        };
        // Every member holds its delivery group: that is not owning one.
        for (id, name) in [(1, "a"), (2, "b"), (3, "c")] {
            s.groups.insert(format!("delivery@{name}"), held(id));
        }
        assert!(!abstains(1, &s, &voters), "owns nothing");
        s.groups.insert("mta".into(), held(1));
        assert!(abstains(1, &s, &voters));
        assert!(!abstains(2, &s, &voters));
        // Every other voter owns a group or is down: it leads if it must.
        s.groups.insert("other".into(), held(2));
        s.members.get_mut(&3).unwrap().state = NodeState::Down;
        assert!(!abstains(1, &s, &voters));
        s.members.get_mut(&3).unwrap().state = up;
        assert!(abstains(1, &s, &voters));
        // A released epoch is not held any more.
        s.groups.get_mut("mta").unwrap().released = true;
        assert!(!abstains(1, &s, &voters));
    }
}
