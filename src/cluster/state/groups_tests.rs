use super::*;
use crate::cluster::state::{ClusterState, Command};

fn assign(epoch: u64, owner: Option<NodeId>) -> GroupCommand {
    GroupCommand::Assign {
        group: "mta".into(),
        epoch,
        owner,
        reason: "placed".into(),
        at_ms: epoch * 10,
        takers: Default::default(),
    }
}

fn revoke(epoch: u64) -> GroupCommand {
    GroupCommand::Revoke {
        group: "mta".into(),
        epoch,
        reason: "owner down".into(),
        at_ms: 5,
    }
}

fn report(epoch: u64, node: NodeId, status: GroupStatus) -> GroupCommand {
    GroupCommand::Report {
        group: "mta".into(),
        epoch,
        node,
        status,
        reason: "r".into(),
        at_ms: 7,
    }
}

#[test]
fn epochs_advance_one_at_a_time() {
    let mut g = GroupState::default();
    assert_eq!(assign(1, Some(1)).apply(&mut g), Response::Done);
    assert_eq!((g.owner, g.epoch), (Some(1), 1));
    // A duplicate or a skipped epoch (a leader acting on an old view).
    assert_eq!(assign(1, Some(2)).apply(&mut g), Response::Stale);
    assert_eq!(assign(3, Some(2)).apply(&mut g), Response::Stale);
    assert_eq!((g.owner, g.epoch), (Some(1), 1));
    // Never over a live epoch: first a revoke (or a release).
    assert_eq!(assign(2, Some(2)).apply(&mut g), Response::Stale);
    revoke(1).apply(&mut g);
    assert_eq!(assign(2, Some(2)).apply(&mut g), Response::Done);
}

#[test]
fn a_revoked_epoch_ends_when_its_owner_releases_it() {
    let mut g = GroupState::default();
    assign(1, Some(1)).apply(&mut g);
    assert_eq!(
        report(1, 1, GroupStatus::Online).apply(&mut g),
        Response::Done
    );
    assert!(!g.released);
    assert_eq!(revoke(1).apply(&mut g), Response::Done);
    assert!(g.revoked);
    assert_eq!(revoke(1).apply(&mut g), Response::Stale, "once");
    assert_eq!(
        report(1, 1, GroupStatus::Stopping).apply(&mut g),
        Response::Done
    );
    assert_eq!(
        report(1, 1, GroupStatus::Offline).apply(&mut g),
        Response::Done
    );
    assert!(g.released);
    // Released is final for the epoch: a late report changes nothing.
    assert_eq!(
        report(1, 1, GroupStatus::Online).apply(&mut g),
        Response::Stale
    );
    assert_eq!(g.status, GroupStatus::Offline);
    assign(2, Some(2)).apply(&mut g);
    assert!(!g.revoked && !g.released);
    assert_eq!(g.status, GroupStatus::Offline);
}

#[test]
fn only_the_owner_reports_and_only_for_its_epoch() {
    let mut g = GroupState::default();
    assign(1, Some(1)).apply(&mut g);
    revoke(1).apply(&mut g);
    assign(2, Some(2)).apply(&mut g);
    assert_eq!(
        report(1, 1, GroupStatus::Online).apply(&mut g),
        Response::Stale
    );
    assert_eq!(
        report(2, 1, GroupStatus::Online).apply(&mut g),
        Response::Stale
    );
    assert_eq!(
        report(2, 2, GroupStatus::Online).apply(&mut g),
        Response::Done
    );
    assert_eq!(g.status, GroupStatus::Online);
}

#[test]
fn a_failed_owner_has_released_the_epoch() {
    let mut g = GroupState::default();
    assign(1, Some(1)).apply(&mut g);
    report(1, 1, GroupStatus::Failed).apply(&mut g);
    assert!(g.released);
    assert_eq!(g.status, GroupStatus::Failed);
}

#[test]
fn a_move_is_cleared_by_the_assignment_it_asked_for() {
    let mut g = GroupState::default();
    assign(1, Some(1)).apply(&mut g);
    let mv = GroupCommand::Move {
        group: "mta".into(),
        to: Some(2),
        at_ms: 1,
    };
    mv.apply(&mut g);
    assert_eq!(g.move_to, Some(2));
    revoke(1).apply(&mut g);
    assign(2, Some(3)).apply(&mut g);
    assert_eq!(g.move_to, Some(2), "not there yet");
    revoke(2).apply(&mut g);
    assign(3, Some(2)).apply(&mut g);
    assert_eq!(g.move_to, None);
}

#[test]
fn fencing_is_recorded_and_lifted() {
    let mut g = GroupState::default();
    let fence = |fenced| GroupCommand::Fence {
        group: "mta".into(),
        node: 4,
        fenced,
        reason: "stop timed out".into(),
        at_ms: 1,
    };
    assert_eq!(fence(true).apply(&mut g), Response::Done);
    assert_eq!(fence(true).apply(&mut g), Response::Stale);
    assert!(g.fenced.contains(&4));
    assert_eq!(fence(false).apply(&mut g), Response::Done);
    assert!(g.fenced.is_empty());
}

#[test]
fn group_commands_ride_in_the_log_and_round_trip() {
    let mut s = ClusterState::default();
    let cmd = Command::Group(assign(1, Some(9)));
    let json = serde_json::to_string(&cmd).unwrap();
    let back: Command = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cmd);
    assert_eq!(s.apply(&back), Response::Done);
    assert_eq!(s.groups["mta"].owner, Some(9));
    // An older snapshot without groups still reads.
    let old: ClusterState = serde_json::from_str(r#"{"members":{}}"#).unwrap();
    assert!(old.groups.is_empty());
}

#[test]
fn a_declaration_sets_placement_and_leaves_the_epoch_alone() {
    let mut g = GroupState::default();
    assert_eq!(assign(1, Some(3)).apply(&mut g), Response::Done);
    let declare = |preferred: &[&str], failback| GroupCommand::Declare {
        group: "mta".into(),
        preferred: preferred.iter().map(|s| s.to_string()).collect(),
        failback,
        lease_ms: 600,
        handover_ms: 35_000,
    };
    assert_eq!(declare(&["b", "a"], true).apply(&mut g), Response::Done);
    assert_eq!(
        (g.preferred.clone(), g.failback),
        (vec!["b".into(), "a".into()], true)
    );
    assert_eq!((g.epoch, g.owner), (1, Some(3)));
    // The same again changes nothing (and writes nothing worth logging).
    assert_eq!(declare(&["b", "a"], true).apply(&mut g), Response::Stale);
    assert_eq!(declare(&["a"], false).apply(&mut g), Response::Done);
    assert_eq!(g.preferred, vec!["a".to_string()]);
}

#[test]
fn a_drain_marks_a_live_epoch_until_the_next_assignment() {
    let mut g = GroupState::default();
    let drain = |epoch| GroupCommand::Drain {
        group: "mta".into(),
        epoch,
        reason: "moving".into(),
        at_ms: 9,
    };
    assert_eq!(drain(0).apply(&mut g), Response::Stale, "nothing placed");
    assert_eq!(assign(1, Some(3)).apply(&mut g), Response::Done);
    assert_eq!(drain(2).apply(&mut g), Response::Stale, "another epoch");
    assert_eq!(drain(1).apply(&mut g), Response::Done);
    assert!(g.draining && !g.revoked, "still live: voters keep granting");
    assert_eq!(drain(1).apply(&mut g), Response::Stale, "once");
    assert_eq!(
        report(1, 3, GroupStatus::Offline).apply(&mut g),
        Response::Done
    );
    assert!(g.released);
    assert_eq!(assign(2, Some(4)).apply(&mut g), Response::Done);
    assert!(!g.draining);
}

#[test]
fn only_a_placement_or_a_declaration_brings_a_group_into_the_state() {
    let mut s = ClusterState::default();
    let typo = GroupCommand::Move {
        group: "mtaa".into(),
        to: Some(2),
        at_ms: 1,
    };
    assert_eq!(s.apply(&Command::Group(typo)), Response::Stale);
    assert_eq!(s.apply(&Command::Group(revoke(1))), Response::Stale);
    assert!(s.groups.is_empty(), "{:?}", s.groups);
    assert_eq!(s.apply(&Command::Group(assign(1, Some(9)))), Response::Done);
    assert!(s.groups.contains_key("mta"));
}

fn counting(epoch: u64, node: NodeId, since: u64) -> Command {
    Command::Group(GroupCommand::Counting {
        group: "mta".into(),
        epoch,
        node,
        since,
    })
}

fn voters(ids: &[NodeId]) -> std::collections::BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

/// The owner was placed under three voters and lags while four more
/// join; its lease may rest on voters 1 and 2 alone. The leader, counting
/// only the new voters, would see the group free while the owner still
/// serves — so it counts every configuration since the owner's, until
/// the owner says it has caught up.
#[test]
fn a_lagging_owner_keeps_its_old_configuration_counted() {
    use crate::cluster::groups::lease::{free_at, Holding};
    use tokio::time::{Duration, Instant};

    let mut s = ClusterState::default();
    s.membership_applied(1, vec![voters(&[1, 2, 3])]);
    assert_eq!(s.apply(&Command::Group(assign(1, Some(1)))), Response::Done);
    assert_eq!(s.groups["mta"].counted_since, 1);
    s.membership_applied(7, vec![voters(&[1, 2, 3]), voters(&[3, 4, 5, 6, 7])]);
    s.membership_applied(8, vec![voters(&[3, 4, 5, 6, 7])]);

    let t0 = Instant::now();
    let lease = Duration::from_millis(600);
    let mut owner = Holding::default();
    owner.granted(1, t0, lease);
    owner.granted(2, t0, lease);
    let held = owner.valid_until(&[voters(&[1, 2, 3])]);
    assert_eq!(held, Some(t0 + lease), "the lagging owner holds");
    // Voters 4, 5 and 6 never granted anything.
    let answers = [(4, t0), (5, t0), (6, t0)].into_iter().collect();
    let newest = [voters(&[3, 4, 5, 6, 7])];
    assert!(
        free_at(&newest, &answers, Duration::ZERO).is_some_and(|f| Some(f) < held),
        "the newest configuration alone would free it early"
    );
    let counted = s.voters.since(s.groups["mta"].counted_since);
    assert!(counted.contains(&voters(&[1, 2, 3])), "{counted:?}");
    assert_eq!(
        free_at(&counted, &answers, Duration::ZERO),
        None,
        "a majority of the owner's configuration must answer"
    );

    // Caught up: only the owner of the epoch may say so, only forward,
    // and never beyond what the log holds.
    assert_eq!(s.apply(&counting(1, 2, 8)), Response::Stale);
    assert_eq!(s.apply(&counting(1, 1, 9)), Response::Stale);
    assert_eq!(s.apply(&counting(1, 1, 8)), Response::Done);
    assert_eq!(s.apply(&counting(1, 1, 7)), Response::Stale);
    assert_eq!(s.voters.since(0), vec![voters(&[3, 4, 5, 6, 7])], "pruned");
}

#[test]
fn history_is_kept_for_an_owner_in_office_only() {
    let mut s = ClusterState::default();
    s.membership_applied(1, vec![voters(&[1])]);
    s.apply(&Command::Group(assign(1, Some(1))));
    s.membership_applied(3, vec![voters(&[1, 2, 3])]);
    assert_eq!(s.voters.since(0).len(), 2, "owner 1 may count in {{1}}");
    s.apply(&Command::Group(report(1, 1, GroupStatus::Offline)));
    assert_eq!(s.voters.since(0), vec![voters(&[1, 2, 3])], "released");
    s.apply(&Command::Group(assign(2, Some(2))));
    assert_eq!(s.groups["mta"].counted_since, 3);
}

#[test]
fn only_an_epoch_taken_back_counts_as_a_failover() {
    let mut g = GroupState::default();
    assign(1, Some(1)).apply(&mut g);
    report(1, 1, GroupStatus::Offline).apply(&mut g);
    assign(2, Some(2)).apply(&mut g);
    assert_eq!(g.failovers, 0, "released: a handover");
    revoke(2).apply(&mut g);
    assign(3, Some(3)).apply(&mut g);
    assert_eq!(g.failovers, 1);
}

#[test]
fn ending_a_revoked_delivery_epoch_elsewhere_records_its_shadows_taken_over() {
    let assign_to = |group: &str, epoch, owner| GroupCommand::Assign {
        group: group.into(),
        epoch,
        owner,
        reason: "test".into(),
        at_ms: 0,
        takers: [7, 8].into(),
    };
    for group in ["delivery@b", "mta"] {
        let mut g = GroupState::default();
        assert_eq!(assign_to(group, 1, Some(2)).apply(&mut g), Response::Done);
        // Revoked and given back to the same incarnation: nothing taken over.
        revoke(1).apply(&mut g);
        assert_eq!(assign_to(group, 2, Some(2)).apply(&mut g), Response::Done);
        assert!(g.promoted.is_empty());
        revoke(2).apply(&mut g);
        assert_eq!(assign_to(group, 3, None).apply(&mut g), Response::Done);
        let promoted: Vec<(NodeId, u64, Vec<NodeId>)> = g
            .promoted
            .iter()
            .map(|(n, p)| (*n, p.epoch, p.takers.iter().copied().collect()))
            .collect();
        let want = if group == "mta" {
            vec![]
        } else {
            vec![(2, 2, vec![7, 8])]
        };
        assert_eq!(promoted, want);
    }
    // Released by its owner (a clean stop), then placed again: no takeover.
    let mut g = GroupState::default();
    assign_to("delivery@b", 1, Some(2)).apply(&mut g);
    report(1, 2, GroupStatus::Offline).apply(&mut g);
    assign_to("delivery@b", 2, Some(5)).apply(&mut g);
    assert!(g.promoted.is_empty());
}
