use openraft::CommittedLeaderId;

use super::*;
use crate::cluster::state::groups::GroupState;
use crate::cluster::state::{MemberState, NodeState, Role};

const T: Thresholds = Thresholds {
    suspect_after: Duration::from_millis(300),
    down_after: Duration::from_millis(1000),
    leader_gone_after: Duration::from_millis(2100),
};

const PERIOD: Duration = Duration::from_millis(100);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The middle of every random range: a period's jitter is 50 ms.
fn half() -> f64 {
    0.5
}

fn machine(t0: Instant) -> Machine {
    let s = Settings {
        period: PERIOD,
        thresholds: T,
        max_voters: 5,
    };
    Machine::new(s, t0, half)
}

fn log(index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn member(id: NodeId) -> Member {
    Member {
        name: format!("n{id}"),
        addr: "127.0.0.1:7400".into(),
        role: Role::Member,
    }
}

/// Node `id` in a settled cluster of the voters 1, 2 and 3, all published
/// up, every entry applied, nobody heard from yet.
fn seen(id: NodeId, state: ServerState, leader: Option<NodeId>) -> Observed {
    let voters: BTreeSet<NodeId> = [1, 2, 3].into();
    let mut cluster = ClusterState::default();
    for &v in &voters {
        let up = MemberState {
            member: member(v),
            state: NodeState::Up,
            since_ms: 0,
        };
        cluster.members.insert(v, up);
    }
    Observed {
        id,
        state,
        leader,
        joint: vec![voters.clone()],
        members: voters.iter().map(|&v| (v, member(v))).collect(),
        voters,
        membership_log: Some(log(3)),
        last_applied: Some(log(10)),
        last_log_index: Some(10),
        matched: BTreeMap::new(),
        cluster,
        acks: BTreeMap::new(),
        outlogged_at: None,
        now_ms: 0,
    }
}

/// `owner` holds a live group.
fn owns(o: &mut Observed, owner: NodeId) {
    let held = GroupState {
        owner: Some(owner),
        epoch: 1,
        ..Default::default()
    };
    o.cluster.groups.insert("mta".into(), held);
}

/// Every other member answered at `at`.
fn heard(o: &mut Observed, at: Instant) {
    o.acks = o
        .members
        .keys()
        .filter(|id| **id != o.id)
        .map(|id| (*id, at))
        .collect();
}

fn elections(on: bool, outlogged: bool) -> Action {
    Action::Elections { on, outlogged }
}

/// A verdict on a member published up.
fn verdict(id: NodeId, state: NodeState) -> Command {
    Command::SetState {
        id,
        state,
        at_ms: 0,
        from: Some(NodeState::Up),
    }
}

#[test]
fn stands_back_after_being_outlogged_and_campaigns_again_after_the_lease() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(2, ServerState::Follower, Some(1));
    o.acks.insert(1, t0);
    o.outlogged_at = Some(t0 + ms(1000));
    assert_eq!(m.tick(&o, t0 + ms(1000)), [elections(false, true)]);
    // The leader has been silent long enough, but this node stands back.
    assert_eq!(m.tick(&o, t0 + ms(2250)), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(3099)), vec![]);
    let out = m.tick(&o, t0 + ms(3100));
    let silent = ms(3100);
    assert_eq!(
        out,
        [elections(true, false), Action::CallElection { silent }]
    );
}

#[test]
fn an_owner_abstains_while_a_voter_that_owns_nothing_is_up() {
    let t0 = Instant::now();
    let mut owner = machine(t0);
    let mut o = seen(1, ServerState::Follower, Some(2));
    owns(&mut o, 1);
    assert_eq!(owner.tick(&o, t0), [elections(false, false)]);
    assert_eq!(owner.tick(&o, t0 + PERIOD), vec![]);
    // Nobody else owns anything: node 2 campaigns as usual.
    let mut other = machine(t0);
    let mut o = seen(2, ServerState::Follower, Some(3));
    owns(&mut o, 1);
    assert_eq!(other.tick(&o, t0), vec![]);
}

#[test]
fn an_owner_campaigns_anyway_after_twice_the_lease_without_a_leader() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Follower, Some(2));
    owns(&mut o, 1);
    assert_eq!(m.tick(&o, t0), [elections(false, false)]);
    o.leader = None;
    assert_eq!(m.tick(&o, t0 + ms(4199)), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(4200)), [elections(true, false)]);
    // A leader again: the state it judges by is fresh, it abstains again.
    o.leader = Some(2);
    assert_eq!(m.tick(&o, t0 + ms(4300)), [elections(false, false)]);
}

#[test]
fn a_split_vote_calls_an_election_off_beat_after_an_election_timeout() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let o = seen(1, ServerState::Candidate, None);
    assert_eq!(m.tick(&o, t0), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(999)), vec![]);
    let pause = ms(150);
    let off_beat = Action::CallElectionOffBeat { pause };
    assert_eq!(m.tick(&o, t0 + ms(1000)), vec![off_beat.clone()]);
    // The next election timeout counts from then.
    assert_eq!(m.tick(&o, t0 + ms(1100)), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(2099)), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(2100)), [off_beat]);
}

#[test]
fn a_candidate_that_stands_back_calls_no_election() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Candidate, None);
    o.outlogged_at = Some(t0);
    assert_eq!(m.tick(&o, t0), [elections(false, true)]);
    assert_eq!(m.tick(&o, t0 + ms(1000)), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(2000)), vec![]);
}

#[test]
fn a_silent_leader_gets_one_election_call() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(2, ServerState::Follower, Some(1));
    o.acks.insert(1, t0);
    assert_eq!(m.tick(&o, t0), vec![]);
    // The lease, a heartbeat and half a heartbeat of jitter.
    assert_eq!(m.tick(&o, t0 + ms(2249)), vec![]);
    let call = Action::CallElection { silent: ms(2250) };
    assert_eq!(m.tick(&o, t0 + ms(2250)), vec![call.clone()]);
    assert_eq!(m.tick(&o, t0 + ms(9000)), vec![], "once for this leader");
    // A new leader that falls silent gets its own call.
    o.leader = Some(3);
    o.acks.insert(3, t0 + ms(9000));
    assert_eq!(m.tick(&o, t0 + ms(9000)), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(11249)), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(11250)), [call]);
}

#[test]
fn a_learner_or_a_follower_that_never_heard_its_leader_calls_nothing() {
    let t0 = Instant::now();
    let mut learner = machine(t0);
    let mut o = seen(4, ServerState::Learner, Some(1));
    o.members.insert(4, member(4));
    o.acks.insert(1, t0);
    assert_eq!(learner.tick(&o, t0 + ms(9000)), vec![]);
    // A learner that is still a follower to openraft.
    o.state = ServerState::Follower;
    assert_eq!(learner.tick(&o, t0 + ms(9100)), vec![]);
    let mut deaf = machine(t0);
    let o = seen(2, ServerState::Follower, Some(1));
    assert_eq!(deaf.tick(&o, t0 + ms(9000)), vec![]);
}

#[test]
fn a_follower_ahead_of_what_it_applied_waits_less() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(2, ServerState::Follower, Some(1));
    o.acks.insert(1, t0);
    o.last_log_index = Some(12);
    // The lease and half the jitter only.
    assert_eq!(m.tick(&o, t0 + ms(2124)), vec![]);
    let out = m.tick(&o, t0 + ms(2125));
    assert_eq!(out, [Action::CallElection { silent: ms(2125) }]);
}

#[test]
fn a_leader_that_owns_a_group_steps_down_and_writes_nothing_meanwhile() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Leader, Some(1));
    owns(&mut o, 1);
    // Unknown to the state and nobody heard: there would be news.
    o.members.insert(4, member(4));
    assert_eq!(m.tick(&o, t0), [elections(false, false), Action::StepDown]);
    assert_eq!(m.tick(&o, t0 + ms(1000)), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(6300)), vec![]);
}

#[test]
fn stepping_down_gives_up_after_three_leases_and_tries_again_after_twenty() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Leader, Some(1));
    owns(&mut o, 1);
    assert_eq!(m.tick(&o, t0), [elections(false, false), Action::StepDown]);
    let mut at = |now: Instant| {
        heard(&mut o, now);
        m.tick(&o, now)
    };
    assert_eq!(at(t0 + ms(6300)), vec![]);
    let gave_up_after = Some(ms(6301));
    assert_eq!(at(t0 + ms(6301)), [Action::LeadOn { gave_up_after }]);
    let again = t0 + ms(6301) + ms(42_000);
    assert_eq!(at(again - ms(1)), vec![]);
    assert_eq!(at(again), [Action::StepDown]);
}

#[test]
fn stepping_down_ends_when_the_leader_owns_nothing_any_more() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Leader, Some(1));
    owns(&mut o, 1);
    heard(&mut o, t0);
    assert_eq!(m.tick(&o, t0), [elections(false, false), Action::StepDown]);
    o.cluster.groups.get_mut("mta").unwrap().released = true;
    heard(&mut o, t0 + PERIOD);
    let out = m.tick(&o, t0 + PERIOD);
    let lead_on = Action::LeadOn {
        gave_up_after: None,
    };
    assert_eq!(out, [elections(true, false), lead_on]);
}

#[test]
fn losing_leadership_while_stepping_down_turns_heartbeats_back_on() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Leader, Some(1));
    owns(&mut o, 1);
    assert_eq!(m.tick(&o, t0), [elections(false, false), Action::StepDown]);
    o.state = ServerState::Follower;
    o.leader = Some(2);
    assert_eq!(m.tick(&o, t0 + PERIOD), [Action::ResumeHeartbeats]);
    assert_eq!(m.tick(&o, t0 + PERIOD * 2), vec![]);
}

#[test]
fn leading_again_counts_silence_from_the_new_leadership() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Leader, Some(1));
    assert_eq!(m.tick(&o, t0), vec![]);
    let suspects = Action::Publish(vec![
        verdict(2, NodeState::Suspect),
        verdict(3, NodeState::Suspect),
    ]);
    assert_eq!(m.tick(&o, t0 + ms(300)), vec![suspects.clone()]);
    o.state = ServerState::Candidate;
    o.leader = None;
    assert_eq!(m.tick(&o, t0 + ms(400)), vec![]);
    o.state = ServerState::Leader;
    o.leader = Some(1);
    assert_eq!(m.tick(&o, t0 + ms(5000)), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(5299)), vec![]);
    assert_eq!(m.tick(&o, t0 + ms(5300)), [suspects]);
}

#[test]
fn the_leader_publishes_what_it_finds() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Leader, Some(1));
    o.members.insert(4, member(4));
    o.now_ms = 7;
    let upsert = Command::Upsert {
        id: 4,
        member: member(4),
    };
    assert_eq!(m.tick(&o, t0), [Action::Publish(vec![upsert.clone()])]);
    o.acks.insert(2, t0 + ms(500));
    let out = m.tick(&o, t0 + ms(500));
    let suspect = |id| Command::SetState {
        id,
        state: NodeState::Suspect,
        at_ms: 7,
        from: Some(NodeState::Up),
    };
    let expected = vec![suspect(3), upsert, suspect(4)];
    assert_eq!(out, [Action::Publish(expected)]);
}

#[test]
fn the_silence_of_the_leader_it_followed_counts_in_full() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Follower, Some(2));
    heard(&mut o, t0);
    assert_eq!(m.tick(&o, t0), vec![]);
    // Elected for 2's silence: that counts from its last answer; 3's
    // answer from before counts from the start of leadership.
    o.state = ServerState::Leader;
    o.leader = Some(1);
    let out = m.tick(&o, t0 + ms(1000));
    assert_eq!(out, [Action::Publish(vec![verdict(2, NodeState::Down)])]);
}

#[test]
fn only_caught_up_learners_are_promoted_and_only_when_settled() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Leader, Some(1));
    o.members.insert(4, member(4));
    let up = MemberState {
        member: member(4),
        state: NodeState::Up,
        since_ms: 0,
    };
    o.cluster.members.insert(4, up);
    o.matched = [(2, 10), (3, 10), (4, 8)].into();
    heard(&mut o, t0);
    assert_eq!(m.tick(&o, t0), vec![], "4 lags two entries behind");
    o.matched.insert(4, 9);
    heard(&mut o, t0 + PERIOD);
    let promote = Action::Promote([4].into());
    assert_eq!(m.tick(&o, t0 + PERIOD), [promote]);
    // A membership change in its joint phase: none other until it ends.
    o.joint = vec![[1, 2, 3].into(), [1, 2].into()];
    o.membership_log = Some(log(11));
    heard(&mut o, t0 + PERIOD * 2);
    assert_eq!(m.tick(&o, t0 + PERIOD * 2), vec![]);
}

#[test]
fn an_interrupted_membership_change_is_finished_once_committed_and_old() {
    let t0 = Instant::now();
    let mut m = machine(t0);
    let mut o = seen(1, ServerState::Leader, Some(1));
    o.joint = vec![[1, 2, 3].into(), [1, 2].into()];
    o.membership_log = Some(log(12));
    o.last_log_index = Some(12);
    let mut at = |o: &mut Observed, now: Instant| {
        heard(o, now);
        m.tick(o, now)
    };
    assert_eq!(at(&mut o, t0), vec![]);
    assert_eq!(at(&mut o, t0 + ms(1000)), vec![], "not committed yet");
    o.last_applied = Some(log(12));
    // News to publish, too: that waits for the next period.
    o.members.insert(4, member(4));
    let finish = |since| Action::FinishJoint {
        voters: [1, 2].into(),
        since,
    };
    assert_eq!(at(&mut o, t0 + ms(1000)), [finish(ms(1000))]);
    // Another joint configuration starts the clock again.
    o.members.remove(&4);
    o.membership_log = Some(log(13));
    o.last_applied = Some(log(13));
    assert_eq!(at(&mut o, t0 + ms(1500)), vec![]);
    assert_eq!(at(&mut o, t0 + ms(2499)), vec![]);
    assert_eq!(at(&mut o, t0 + ms(2500)), [finish(ms(1000))]);
}
