use super::*;
use crate::cluster::types::{ClusterState, Command};

fn assign(epoch: u64, owner: Option<NodeId>) -> GroupCommand {
    GroupCommand::Assign {
        group: "mta".into(),
        epoch,
        owner,
        reason: "placed".into(),
        at_ms: epoch * 10,
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
