use super::*;
use crate::cluster::state::Role;

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 7400))
}

fn fresh(name: &str) -> SeedView {
    SeedView::Fresh { name: name.into() }
}

#[test]
fn a_node_without_seeds_bootstraps_alone() {
    assert_eq!(start("a", &[]), Start::Bootstrap);
}

#[test]
fn any_initialized_seed_means_join_through_it() {
    let seeds = [(addr(2), fresh("b")), (addr(3), SeedView::Member)];
    assert_eq!(start("a", &seeds), Start::Join(addr(3)));
    let seeds = [(addr(3), SeedView::Member)];
    assert_eq!(start("z", &seeds), Start::Join(addr(3)));
}

#[test]
fn only_the_lowest_name_bootstraps_and_only_when_every_seed_is_fresh() {
    let seeds = [(addr(2), fresh("b")), (addr(3), fresh("c"))];
    assert_eq!(start("a", &seeds), Start::Bootstrap);
    let seeds = [(addr(1), fresh("a")), (addr(3), fresh("c"))];
    assert_eq!(start("b", &seeds), Start::Wait);
    let seeds = [(addr(2), fresh("b")), (addr(3), SeedView::Unreachable)];
    assert_eq!(start("a", &seeds), Start::Wait);
}

#[test]
fn no_two_nodes_bootstrap_whatever_each_can_see() {
    // Five fresh nodes; every node sees an arbitrary subset of the others
    // (asymmetric and partial views, as during start-up races). Across
    // all 2^20 combinations of views, at most one node bootstraps.
    let names = ["a", "b", "c", "d", "e"];
    for views in 0u32..(1 << 20) {
        let mut bootstrappers = 0;
        for (i, me) in names.iter().enumerate() {
            let bits = views >> (i * 4) & 0xF;
            let seeds: Vec<_> = names
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .enumerate()
                .map(|(k, (j, n))| {
                    let view = if bits >> k & 1 == 1 {
                        fresh(n)
                    } else {
                        SeedView::Unreachable
                    };
                    (addr(j as u8 + 1), view)
                })
                .collect();
            bootstrappers += usize::from(start(me, &seeds) == Start::Bootstrap);
        }
        assert!(
            bootstrappers <= 1,
            "views {views:020b}: {bootstrappers} bootstrap"
        );
    }
}

fn join(name: &str, incarnation: NodeId) -> JoinRequest {
    JoinRequest {
        name: name.into(),
        incarnation,
        addr: addr(9),
        role: Role::Member,
        generation: 0,
        start: 0,
    }
}

fn known(entries: &[(NodeId, &str, bool)]) -> BTreeMap<NodeId, Known> {
    entries
        .iter()
        .map(|&(id, name, voter)| {
            let member = Member {
                name: name.into(),
                addr: addr(9).to_string(),
                role: Role::Member,
            };
            (id, Known { member, voter })
        })
        .collect()
}

fn record(name: &str) -> Member {
    Member {
        name: name.into(),
        addr: addr(9).to_string(),
        role: Role::Member,
    }
}

#[test]
fn a_new_name_is_added_as_learner_with_a_free_voter_slot() {
    let k = known(&[(1, "a", true), (2, "b", true)]);
    assert_eq!(
        admit(&k, &join("c", 3), 5),
        Admission::Steps {
            steps: vec![
                Step::Record(3, record("c")),
                Step::AddLearner(3, record("c")),
            ],
            voter: true
        }
    );
}

#[test]
fn past_max_voters_a_node_joins_as_non_voter() {
    let k = known(&[(1, "a", true), (2, "b", true), (3, "c", true)]);
    match admit(&k, &join("d", 4), 3) {
        Admission::Steps { voter, .. } => assert!(!voter),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_wiped_node_replaces_its_stale_entry_leaving_the_voter_set_first() {
    let k = known(&[(1, "a", true), (2, "b", true), (3, "c", true)]);
    assert_eq!(
        admit(&k, &join("c", 30), 3),
        Admission::Steps {
            steps: vec![
                Step::RemoveNode(3),
                Step::Forget(3),
                Step::Record(30, record("c")),
                Step::AddLearner(30, record("c")),
            ],
            voter: true
        }
    );
}

#[test]
fn an_old_disk_brought_back_is_refused() {
    let k = known(&[(1, "a", true), (30, "c", true)]);
    match admit(&k, &join("c", 3), 5) {
        Admission::Refuse(why) => assert!(why.contains("newer incarnation 30"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn asking_again_after_a_cut_connection_is_idempotent() {
    // Admitted as a voter already: nothing to do.
    let k = known(&[(1, "a", true), (3, "c", true)]);
    assert_eq!(
        admit(&k, &join("c", 3), 5),
        Admission::Steps {
            steps: vec![],
            voter: true
        }
    );
    // Cut after the learner step: nothing left; the detector promotes.
    let k = known(&[(1, "a", true), (3, "c", false)]);
    assert_eq!(
        admit(&k, &join("c", 3), 5),
        Admission::Steps {
            steps: vec![],
            voter: true
        }
    );
}
