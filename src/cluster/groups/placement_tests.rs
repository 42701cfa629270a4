use super::*;
use crate::cluster::state::{Command, Member, MemberState, Response};

/// Members a=1, b=2, c=3 (all up) and witness w=9.
fn state() -> ClusterState {
    let mut s = ClusterState::default();
    for (id, n, role) in [
        (1, "a", Role::Member),
        (2, "b", Role::Member),
        (3, "c", Role::Member),
        (9, "w", Role::Witness),
    ] {
        s.members.insert(
            id,
            MemberState {
                member: Member {
                    name: n.into(),
                    addr: format!("127.0.0.{id}:7400"),
                    role,
                },
                state: NodeState::Up,
                since_ms: 0,
            },
        );
    }
    s
}

fn set_state(s: &mut ClusterState, id: NodeId, st: NodeState) {
    s.members.get_mut(&id).unwrap().state = st;
}

fn owned_by<'s>(s: &'s mut ClusterState, group: &str, owner: NodeId) -> &'s mut GroupState {
    let g = s.groups.entry(group.into()).or_default();
    g.owner = Some(owner);
    g.epoch = 1;
    g
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn assigned(d: Decision) -> NodeId {
    match d {
        Decision::Assign { owner, .. } => owner,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

fn policy<'a>(pref: &'a [String], failback: bool) -> Policy<'a> {
    Policy {
        name: "mta",
        preferred: pref,
        failback,
        handover_ms: 10_000,
        now_ms: 1_000_000,
    }
}

#[test]
fn a_new_group_goes_to_the_first_live_preferred_node() {
    let pref = names(&["c", "b"]);
    let mut s = state();
    assert_eq!(assigned(decide(policy(&pref, false), &s, false)), 3);
    set_state(&mut s, 3, NodeState::Down);
    assert_eq!(assigned(decide(policy(&pref, false), &s, false)), 2);
    set_state(&mut s, 3, NodeState::Suspect);
    assert_eq!(
        assigned(decide(policy(&pref, false), &s, false)),
        2,
        "suspect is not live enough to start on"
    );
}

#[test]
fn without_preference_the_least_loaded_member_and_never_a_witness() {
    let none: Vec<String> = vec![];
    let mut s = state();
    owned_by(&mut s, "other", 1);
    let n = assigned(decide(policy(&none, false), &s, false));
    assert_eq!(n, 2, "b: no groups yet, lowest name among the idle");
    for id in [1, 2, 3] {
        set_state(&mut s, id, NodeState::Down);
    }
    assert_eq!(decide(policy(&none, false), &s, false), Decision::Keep);
}

#[test]
fn a_healthy_or_suspect_owner_keeps_its_group() {
    let pref = names(&["a"]);
    let mut s = state();
    owned_by(&mut s, "mta", 2);
    assert_eq!(decide(policy(&pref, false), &s, false), Decision::Keep);
    set_state(&mut s, 2, NodeState::Suspect);
    assert_eq!(decide(policy(&pref, false), &s, false), Decision::Keep);
}

#[test]
fn an_owner_that_is_down_gone_left_or_fenced_is_revoked() {
    let pref = names(&[]);
    for (change, why) in [
        (0, "down"),
        (1, "no longer a member"),
        (2, "left"),
        (3, "fenced"),
    ] {
        let mut s = state();
        owned_by(&mut s, "mta", 2);
        match change {
            0 => set_state(&mut s, 2, NodeState::Down),
            1 => {
                s.members.remove(&2);
            }
            2 => set_state(&mut s, 2, NodeState::Left),
            _ => {
                s.groups.get_mut("mta").unwrap().fenced.insert(2);
            }
        }
        match decide(policy(&pref, false), &s, false) {
            Decision::Revoke { reason } => assert!(reason.contains(why), "{reason}"),
            other => panic!("{why}: {other:?}"),
        }
    }
}

#[test]
fn a_revoked_epoch_waits_for_release_or_for_grants_to_run_out() {
    let pref = names(&[]);
    let mut s = state();
    set_state(&mut s, 2, NodeState::Down);
    owned_by(&mut s, "mta", 2).revoked = true;
    assert_eq!(
        decide(policy(&pref, false), &s, false),
        Decision::AwaitGrants
    );
    let n = assigned(decide(policy(&pref, false), &s, true));
    assert!(n == 1 || n == 3, "{n}");
    s.groups.get_mut("mta").unwrap().released = true;
    assigned(decide(policy(&pref, false), &s, false));
}

#[test]
fn a_failed_owner_is_not_given_the_group_straight_back() {
    let pref = names(&["b", "a"]);
    let mut s = state();
    let g = owned_by(&mut s, "mta", 2);
    g.status = GroupStatus::Failed;
    g.released = true;
    assert_eq!(assigned(decide(policy(&pref, false), &s, false)), 1);
}

#[test]
fn an_operator_move_drains_then_places_on_the_target() {
    let pref = names(&["a"]);
    let mut s = state();
    owned_by(&mut s, "mta", 1).move_to = Some(3);
    match decide(policy(&pref, false), &s, false) {
        Decision::Drain { reason } => assert!(reason.contains("moving to c"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Draining: nothing more until the owner releases — unless it dies,
    // or the handover is long overdue (its release lost, say).
    let g = s.groups.get_mut("mta").unwrap();
    g.draining = true;
    g.draining_since_ms = 990_000;
    assert_eq!(decide(policy(&pref, false), &s, false), Decision::Keep);
    let mut overdue = s.clone();
    overdue.groups.get_mut("mta").unwrap().draining_since_ms = 979_999;
    assert!(matches!(
        decide(policy(&pref, false), &overdue, false),
        Decision::Revoke { reason } if reason.contains("in time")
    ));
    let mut dead = s.clone();
    set_state(&mut dead, 1, NodeState::Down);
    assert!(matches!(
        decide(policy(&pref, false), &dead, false),
        Decision::Revoke { .. }
    ));
    s.groups.get_mut("mta").unwrap().released = true;
    assert_eq!(assigned(decide(policy(&pref, false), &s, false)), 3);
    // A move to a node that cannot take it is ignored.
    let mut s = state();
    owned_by(&mut s, "mta", 1).move_to = Some(9);
    assert_eq!(decide(policy(&pref, false), &s, false), Decision::Keep);
}

#[test]
fn failback_only_when_asked() {
    let pref = names(&["a", "b"]);
    let mut s = state();
    owned_by(&mut s, "mta", 2);
    assert_eq!(decide(policy(&pref, false), &s, false), Decision::Keep);
    match decide(policy(&pref, true), &s, false) {
        Decision::Drain { reason } => assert!(reason.contains("failing back to a")),
        other => panic!("{other:?}"),
    }
    set_state(&mut s, 1, NodeState::Down);
    assert_eq!(decide(policy(&pref, true), &s, false), Decision::Keep);
}

#[test]
fn owned_lists_live_epochs_only() {
    let mut s = state();
    owned_by(&mut s, "x", 1);
    owned_by(&mut s, "y", 1).released = true;
    assert_eq!(owned(&s), BTreeMap::from([(1, vec!["x".to_string()])]));
}

#[test]
fn a_draining_owner_hands_over_and_gets_nothing_new() {
    let pref = names(&["a", "b"]);
    let mut s = state();
    owned_by(&mut s, "mta", 1);
    assert_eq!(
        s.apply(&Command::Drain {
            id: 1,
            draining: true
        }),
        Response::Done
    );
    assert!(matches!(
        decide(policy(&pref, false), &s, false),
        Decision::Drain { reason } if reason.contains("draining")
    ));
    // Once released, the next preferred node that is not draining.
    s.groups.get_mut("mta").unwrap().released = true;
    assert_eq!(assigned(decide(policy(&pref, false), &s, false)), 2);
    // With nobody else to take it, the owner keeps serving.
    for id in [2, 3] {
        s.apply(&Command::Drain { id, draining: true });
    }
    let g = owned_by(&mut s, "mta", 1);
    g.released = false;
    assert!(matches!(
        decide(policy(&pref, false), &s, false),
        Decision::Keep
    ));
    assert_eq!(
        s.apply(&Command::Drain {
            id: 7,
            draining: true
        }),
        Response::UnknownMember
    );
    assert_eq!(
        s.apply(&Command::Drain {
            id: 1,
            draining: false
        }),
        Response::Done
    );
    assert_eq!(
        s.apply(&Command::Drain {
            id: 1,
            draining: false
        }),
        Response::Stale
    );
}

fn delivery_policy(name: &str) -> Policy<'_> {
    Policy {
        name,
        preferred: &[],
        failback: false,
        handover_ms: 10_000,
        now_ms: 1_000_000,
    }
}

#[test]
fn a_delivery_group_goes_to_its_member_only_draining_or_not() {
    let mut s = state();
    let p = delivery_policy("delivery@b");
    assert_eq!(assigned(decide(p, &s, false)), 2);
    s.draining.insert(2);
    assert_eq!(
        assigned(decide(p, &s, false)),
        2,
        "a draining node delivers"
    );
    set_state(&mut s, 2, NodeState::Down);
    assert_eq!(decide(p, &s, false), Decision::Keep, "nobody else takes it");
    // A witness has none to take.
    assert_eq!(
        decide(delivery_policy("delivery@w"), &state(), false),
        Decision::Keep
    );
}

#[test]
fn a_failed_members_delivery_epoch_ends_unowned_once_its_grants_ran_out() {
    let mut s = state();
    let p = delivery_policy("delivery@b");
    owned_by(&mut s, "delivery@b", 2);
    assert_eq!(decide(p, &s, false), Decision::Keep);
    set_state(&mut s, 2, NodeState::Down);
    assert!(matches!(decide(p, &s, false), Decision::Revoke { .. }));
    s.groups.get_mut("delivery@b").unwrap().revoked = true;
    assert_eq!(decide(p, &s, false), Decision::AwaitGrants);
    assert!(matches!(decide(p, &s, true), Decision::Unplace { .. }));
    // Back before that: it gets the group again, nothing is taken over.
    set_state(&mut s, 2, NodeState::Up);
    assert_eq!(assigned(decide(p, &s, true)), 2);
}

#[test]
fn a_delivery_group_released_by_its_member_waits_for_it() {
    let mut s = state();
    let p = delivery_policy("delivery@b");
    owned_by(&mut s, "delivery@b", 2).released = true;
    set_state(&mut s, 2, NodeState::Left);
    assert_eq!(
        decide(p, &s, false),
        Decision::Keep,
        "a clean stop keeps its queue"
    );
    // Evicted: gone for good, so its epoch is taken back and ended.
    s.members.remove(&2);
    assert!(matches!(decide(p, &s, false), Decision::Revoke { .. }));
}
