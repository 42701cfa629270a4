use proptest::prelude::*;

use super::*;

const TTL: Duration = Duration::from_millis(600);

fn group(owner: NodeId, epoch: u64) -> GroupState {
    GroupState {
        owner: Some(owner),
        epoch,
        ..GroupState::default()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

#[test]
fn a_voter_grants_only_the_owner_of_a_live_epoch() {
    let t0 = Instant::now();
    let mut v = Grants::new(t0, TTL);
    let g = group(7, 3);
    assert_eq!(v.grant("mta", 7, 3, Some(&g), TTL, t0), Ok(TTL));
    let other = |epoch, owner| Err(GrantRefusal::OtherOwner { epoch, owner });
    // Not the owner; an old epoch; an epoch not seen here yet.
    assert_eq!(v.grant("mta", 8, 3, Some(&g), TTL, t0), other(3, Some(7)));
    assert_eq!(v.grant("mta", 7, 2, Some(&g), TTL, t0), other(3, Some(7)));
    assert_eq!(v.grant("mta", 7, 4, Some(&g), TTL, t0), other(3, Some(7)));
    assert_eq!(
        v.grant("mta", 7, 3, None, TTL, t0),
        Err(GrantRefusal::UnknownGroup)
    );
    let over = Err(GrantRefusal::EpochOver);
    let revoked = GroupState {
        revoked: true,
        ..g.clone()
    };
    assert_eq!(v.grant("mta", 7, 3, Some(&revoked), TTL, t0), over);
    let released = GroupState {
        released: true,
        ..g
    };
    assert_eq!(v.grant("mta", 7, 3, Some(&released), TTL, t0), over);
}

#[test]
fn grants_are_capped() {
    let t0 = Instant::now();
    let mut v = Grants::new(t0, TTL);
    let long = Duration::from_secs(3600);
    assert_eq!(
        v.grant("mta", 7, 3, Some(&group(7, 3)), long, t0),
        Ok(MAX_LEASE)
    );
}

#[test]
fn a_restarted_voter_vouches_for_a_whole_lease_it_may_have_given() {
    let t0 = Instant::now();
    let v = Grants::new(t0, TTL);
    assert_eq!(v.outstanding("mta", t0), TTL);
    assert_eq!(v.outstanding("mta", t0 + ms(100)), ms(500));
    assert_eq!(v.outstanding("mta", t0 + ms(700)), Duration::ZERO);
}

#[test]
fn outstanding_is_the_latest_promise() {
    let t0 = Instant::now();
    let mut v = Grants::new(t0, Duration::ZERO);
    let g = group(7, 3);
    v.grant("mta", 7, 3, Some(&g), TTL, t0).unwrap();
    v.grant("mta", 7, 3, Some(&g), TTL, t0 + ms(200)).unwrap();
    assert_eq!(v.outstanding("mta", t0 + ms(300)), ms(500));
    assert_eq!(v.outstanding("other", t0), Duration::ZERO);
}

#[test]
fn an_owner_holds_while_a_majority_of_grants_lasts() {
    let t0 = Instant::now();
    let voters = [set(&[1, 2, 3])];
    let mut h = Holding::default();
    h.granted(1, t0, TTL);
    assert_eq!(h.valid_until(&voters), None, "one of three");
    h.granted(2, t0 + ms(100), TTL);
    assert_eq!(
        h.valid_until(&voters),
        Some(t0 + TTL),
        "ends with the older"
    );
    h.granted(3, t0 + ms(200), TTL);
    assert_eq!(h.valid_until(&voters), Some(t0 + ms(100) + TTL));
    // A grant for a request sent earlier never shortens one.
    h.granted(3, t0, TTL);
    assert_eq!(h.valid_until(&voters), Some(t0 + ms(100) + TTL));
    // In a joint configuration both majorities must hold.
    let joint = [set(&[1, 2, 3]), set(&[3, 4, 5])];
    assert_eq!(h.valid_until(&joint), None);
    h.granted(4, t0, TTL);
    assert_eq!(h.valid_until(&joint), Some(t0 + TTL));
    h.clear();
    assert_eq!(h.valid_until(&voters), None);
}

#[test]
fn free_once_a_majority_of_answers_has_run_out() {
    let t0 = Instant::now();
    let voters = [set(&[1, 2, 3])];
    let m = ms(50);
    let one = BTreeMap::from([(1, t0)]);
    assert_eq!(
        free_at(&voters, &one, m),
        None,
        "one answer is not a majority"
    );
    let two = BTreeMap::from([(1, t0 + ms(300)), (3, t0 + ms(100))]);
    assert_eq!(free_at(&voters, &two, m), Some(t0 + ms(350)));
    let three = BTreeMap::from([(1, t0 + ms(300)), (2, t0 + ms(900)), (3, t0)]);
    assert_eq!(free_at(&voters, &three, m), Some(t0 + ms(350)));
    let joint = [set(&[1, 2, 3]), set(&[3, 4, 5])];
    assert_eq!(free_at(&joint, &three, m), None);
    let more = BTreeMap::from([(1, t0), (2, t0), (4, t0 + ms(700)), (5, t0 + ms(800))]);
    assert_eq!(free_at(&joint, &more, m), Some(t0 + ms(850)));
}

/// One voter in the safety model: when it applies the revoke, and the
/// delays of its messages.
#[derive(Debug, Clone)]
struct Voter {
    revoke_applied: u64,
    to_voter: u64,
    ask_at: u64,
    answer_delay: u64,
}

fn voter() -> impl Strategy<Value = Voter> {
    (0u64..2000, 0u64..300, 0u64..3000, 0u64..300).prop_map(|(r, d, a, ad)| Voter {
        revoke_applied: r,
        to_voter: d,
        ask_at: a,
        answer_delay: ad,
    })
}

proptest! {
    /// Whatever the timing of renewals, revocation and answers, the
    /// owner's lease has ended by the time the leader deems the group free.
    #[test]
    fn the_old_owner_never_holds_past_free(
        voters in prop::collection::vec(voter(), 1..=6),
        sends in prop::collection::vec((0u64..2500, any::<u32>()), 1..40),
        restarted in prop::collection::vec(any::<bool>(), 6),
    ) {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ids: BTreeSet<NodeId> = (1..=voters.len() as NodeId).collect();
        let g = group(99, 1);
        let revoked = GroupState { revoked: true, ..g.clone() };
        let mut grants: Vec<Grants> =
            voters.iter().map(|_| Grants::new(t0, TTL)).collect();
        let mut holding = Holding::default();
        // Each renewal goes to a subset of voters (bit i: voter i).
        let mut sends = sends;
        sends.sort();
        for (sent, mask) in &sends {
            for (i, v) in voters.iter().enumerate() {
                if mask & (1 << i) == 0 {
                    continue;
                }
                let arrives = sent + v.to_voter;
                // After the revoke is applied the voter refuses.
                let state = if arrives >= v.revoke_applied { &revoked } else { &g };
                if let Ok(ttl) = grants[i].grant("mta", 99, 1, Some(state), TTL, at(arrives)) {
                    holding.granted(i as NodeId + 1, at(*sent), ttl);
                }
            }
        }
        // The leader asks each voter after it applied the revoke; a voter
        // that restarted forgets its promises but keeps its grace.
        let mut answers = BTreeMap::new();
        for (i, v) in voters.iter().enumerate() {
            let asked = v.ask_at.max(v.revoke_applied);
            let voter = if restarted[i] {
                Grants::new(at(v.revoke_applied.min(asked)), TTL)
            } else {
                std::mem::replace(&mut grants[i], Grants::new(t0, TTL))
            };
            let remaining = voter.outstanding("mta", at(asked));
            answers.insert(i as NodeId + 1, at(asked + v.answer_delay) + remaining);
        }
        let configs = [ids];
        if let (Some(held), Some(free)) =
            (holding.valid_until(&configs), free_at(&configs, &answers, Duration::ZERO))
        {
            prop_assert!(held <= free, "held until {:?}, free at {:?}", held - t0, free - t0);
        }
    }
}

#[test]
fn an_owner_holds_in_any_one_configuration() {
    let t0 = Instant::now();
    let old = set(&[1, 2, 3]);
    let new = set(&[1, 2, 3, 4, 5, 6, 7]);
    let mut h = Holding::default();
    h.granted(1, t0, TTL);
    h.granted(2, t0, TTL);
    let both = [old.clone(), new.clone()];
    assert_eq!(h.valid_until(&both), None, "every one: not in the new");
    assert_eq!(h.valid_in_any(&both), Some(t0 + TTL), "one is enough");
    assert_eq!(h.valid_in_any(std::slice::from_ref(&new)), None);
    for v in [4, 5] {
        h.granted(v, t0 + ms(10), TTL);
    }
    assert_eq!(
        h.valid_in_any(&[new]),
        Some(t0 + TTL),
        "1, 2, 4, 5 of seven"
    );
}

#[test]
fn in_an_even_configuration_half_of_the_answers_free_the_group() {
    // Of two voters the owner needs both; one that ran out is enough.
    let t0 = Instant::now();
    let two = [set(&[1, 2])];
    let answers = BTreeMap::from([(2, t0 + ms(100))]);
    assert_eq!(free_at(&two, &answers, ms(0)), Some(t0 + ms(100)));
    // Of four it needs three; two that ran out are enough, one is not.
    let four = [set(&[1, 2, 3, 4])];
    assert_eq!(free_at(&four, &answers, ms(0)), None);
    let answers = BTreeMap::from([(2, t0 + ms(100)), (4, t0 + ms(300))]);
    assert_eq!(free_at(&four, &answers, ms(0)), Some(t0 + ms(300)));
    // A single voter must answer itself.
    assert_eq!(free_at(&[set(&[1])], &answers, ms(0)), None);
}
