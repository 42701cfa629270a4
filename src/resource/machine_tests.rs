use super::*;

const S: Settings = Settings {
    check_interval: Duration::from_secs(2),
    start_timeout: Duration::from_secs(10),
    max_restarts: 2,
    restart_window: Duration::from_secs(60),
    stop_margin: Duration::from_millis(100),
    claim_retry: Duration::from_millis(50),
    stop_retry: Duration::from_secs(1),
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn view(ours: bool, epoch: u64, live: bool, draining: bool) -> Event {
    Event::View {
        ours,
        epoch,
        live,
        draining,
    }
}

fn mine(epoch: u64) -> Event {
    view(true, epoch, true, false)
}

/// Epoch 1, ours, revoked by the leader.
fn revoked() -> Event {
    view(true, 1, false, false)
}

/// Epoch 1, ours, and the leader asks for a handover.
fn draining() -> Event {
    view(true, 1, true, true)
}

fn reports(actions: &[Action]) -> Vec<GroupStatus> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Report(_, s, _) => Some(*s),
            _ => None,
        })
        .collect()
}

/// The claim found nobody else holding the resources: the start follows.
fn claimed(m: &mut Machine, now: Instant) -> Vec<Action> {
    m.on(Event::Done(Op::Claim, Ok(())), now)
}

/// A machine online under epoch 1 with a lease until t0 + 600 ms.
fn online(t0: Instant) -> Machine {
    let mut m = Machine::new(S);
    assert_eq!(m.on(mine(1), t0), vec![]);
    assert_eq!(m.phase(), Phase::Waiting);
    let out = m.on(Event::Lease(Some(t0 + ms(600))), t0);
    assert_eq!(out, vec![Action::Claim], "claimed before it starts");
    let out = claimed(&mut m, t0);
    assert!(
        out.contains(&Action::Start {
            deadline: t0 + ms(500)
        }),
        "{out:?}"
    );
    let out = m.on(Event::Done(Op::Start, Ok(())), t0 + ms(10));
    assert_eq!(reports(&out), [GroupStatus::Online]);
    assert_eq!(m.phase(), Phase::Online);
    m
}

#[test]
fn nothing_runs_until_the_group_is_ours_and_the_lease_holds() {
    let t0 = Instant::now();
    let mut m = Machine::new(S);
    let theirs = view(false, 1, true, false);
    assert_eq!(m.on(theirs, t0), vec![]);
    assert_eq!(m.on(Event::Lease(Some(t0 + ms(600))), t0), vec![]);
    assert_eq!(m.phase(), Phase::Idle);
    assert_eq!(m.renewing(), None);
    online(t0);
}

#[test]
fn a_lease_too_short_to_stop_in_time_starts_nothing() {
    let t0 = Instant::now();
    let mut m = Machine::new(S);
    m.on(mine(1), t0);
    assert_eq!(m.renewing(), Some(1));
    assert_eq!(m.on(Event::Lease(Some(t0 + ms(100))), t0), vec![]);
    assert_eq!(m.phase(), Phase::Waiting);
}

#[test]
fn the_start_deadline_never_passes_the_lease() {
    let t0 = Instant::now();
    let mut m = Machine::new(Settings {
        start_timeout: ms(50),
        ..S
    });
    m.on(mine(1), t0);
    m.on(Event::Lease(Some(t0 + ms(600))), t0);
    let out = claimed(&mut m, t0);
    assert!(out.contains(&Action::Start {
        deadline: t0 + ms(50)
    }));
}

#[test]
fn resources_stop_hard_before_the_lease_can_run_out_and_come_back_with_it() {
    let t0 = Instant::now();
    let mut m = online(t0);
    assert_eq!(m.next_wake(), Some(t0 + ms(500)));
    let out = m.on(Event::Tick, t0 + ms(500));
    assert_eq!(out, vec![Action::Stop { graceful: false }]);
    assert_eq!(m.renewing(), Some(1), "still ours: keep asking");
    let out = m.on(Event::Done(Op::Stop, Ok(())), t0 + ms(510));
    assert!(reports(&out).is_empty(), "not released: {out:?}");
    assert_eq!(m.phase(), Phase::Waiting);
    let out = m.on(Event::Lease(Some(t0 + ms(1200))), t0 + ms(700));
    assert_eq!(out, vec![Action::Claim], "another may hold it by now");
    let out = claimed(&mut m, t0 + ms(710));
    assert!(matches!(out.last(), Some(Action::Start { .. })), "{out:?}");
}

#[test]
fn a_revoked_epoch_stops_at_once_and_is_released() {
    // Nobody renews a revoked lease: a drain could outlast it.
    let t0 = Instant::now();
    let mut m = online(t0);
    let out = m.on(revoked(), t0 + ms(100));
    assert_eq!(reports(&out), [GroupStatus::Stopping]);
    assert!(out.contains(&Action::Stop { graceful: false }), "{out:?}");
    assert_eq!(m.renewing(), None);
    let out = m.on(Event::Done(Op::Stop, Ok(())), t0 + ms(200));
    assert_eq!(reports(&out), [GroupStatus::Offline]);
    assert_eq!(m.phase(), Phase::Done);
    // A later lease changes nothing under this epoch.
    assert_eq!(m.on(Event::Lease(Some(t0 + ms(900))), t0 + ms(300)), vec![]);
}

#[test]
fn a_handover_drains_under_a_renewed_lease_then_releases() {
    let t0 = Instant::now();
    let mut m = online(t0);
    let out = m.on(draining(), t0 + ms(100));
    assert_eq!(reports(&out), [GroupStatus::Stopping]);
    assert!(out.contains(&Action::Stop { graceful: true }), "{out:?}");
    assert_eq!(m.renewing(), Some(1), "the lease stays live while draining");
    // Renewed meanwhile: no hurry.
    assert_eq!(
        m.on(Event::Lease(Some(t0 + ms(1200))), t0 + ms(700)),
        vec![]
    );
    let out = m.on(Event::Done(Op::Stop, Ok(())), t0 + ms(900));
    assert_eq!(reports(&out), [GroupStatus::Offline]);
    assert_eq!(m.phase(), Phase::Done);
}

#[test]
fn a_drain_is_hurried_before_the_lease_can_run_out() {
    let t0 = Instant::now();
    let mut m = online(t0);
    m.on(draining(), t0 + ms(100));
    assert_eq!(m.next_wake(), Some(t0 + ms(500)));
    assert_eq!(m.on(Event::Tick, t0 + ms(500)), vec![Action::Hurry]);
    // Once.
    assert_eq!(m.on(Event::Tick, t0 + ms(520)), vec![]);
    // A revoke in the middle of a drain hurries it too.
    let mut m = online(t0);
    m.on(draining(), t0 + ms(100));
    assert_eq!(m.on(revoked(), t0 + ms(150)), vec![Action::Hurry]);
}

#[test]
fn revoked_before_starting_releases_without_a_stop() {
    let t0 = Instant::now();
    let mut m = Machine::new(S);
    m.on(mine(1), t0);
    let revoked = revoked();
    let out = m.on(revoked, t0);
    assert_eq!(reports(&out), [GroupStatus::Offline]);
    assert!(!out.iter().any(|a| matches!(a, Action::Stop { .. })));
}

#[test]
fn failed_checks_restart_in_place_then_fail_the_group_over() {
    let t0 = Instant::now();
    let mut m = online(t0);
    let mut now = t0;
    for round in 0..3 {
        let lease = Event::Lease(Some(now + ms(600)));
        m.on(lease, now);
        now += S.check_interval + ms(10);
        let lease = Event::Lease(Some(now + ms(600)));
        let mut out = m.on(lease, now);
        out.extend(m.on(Event::Tick, now));
        assert_eq!(out, vec![Action::Check], "round {round}");
        let out = m.on(Event::Done(Op::Check, Err("no 220".into())), now);
        assert!(out.contains(&Action::Stop { graceful: false }));
        let out = m.on(Event::Done(Op::Stop, Ok(())), now);
        if round < 2 {
            assert_eq!(out.last(), Some(&Action::Claim), "{out:?}");
            let out = claimed(&mut m, now);
            assert!(matches!(out.last(), Some(Action::Start { .. })), "{out:?}");
            m.on(Event::Done(Op::Start, Ok(())), now);
        } else {
            assert_eq!(reports(&out), [GroupStatus::Failed]);
            assert_eq!(m.phase(), Phase::Done);
        }
    }
}

#[test]
fn restarts_outside_the_window_are_forgotten() {
    let t0 = Instant::now();
    let mut m = online(t0);
    let mut now = t0;
    for _ in 0..4 {
        now += S.restart_window + ms(1);
        m.on(Event::Lease(Some(now + ms(600))), now);
        m.on(Event::Done(Op::Check, Err("down".into())), now);
        m.on(Event::Done(Op::Stop, Ok(())), now);
        let out = claimed(&mut m, now);
        assert!(matches!(out.last(), Some(Action::Start { .. })), "{out:?}");
        m.on(Event::Done(Op::Start, Ok(())), now);
    }
}

#[test]
fn a_start_that_times_out_is_a_failure() {
    let t0 = Instant::now();
    let mut m = Machine::new(S);
    m.on(mine(1), t0);
    m.on(Event::Lease(Some(t0 + ms(600))), t0);
    claimed(&mut m, t0);
    let out = m.on(
        Event::Done(Op::Start, Err("timed out".into())),
        t0 + ms(400),
    );
    assert!(out.contains(&Action::Stop { graceful: false }), "{out:?}");
}

#[test]
fn a_stop_that_fails_fences_the_node_and_is_tried_until_it_succeeds() {
    let t0 = Instant::now();
    let mut m = online(t0);
    m.on(Event::Tick, t0 + ms(500));
    let out = m.on(Event::Done(Op::Stop, Err("timed out".into())), t0 + ms(600));
    assert!(matches!(&out[..], [Action::Fence(_)]), "{out:?}");
    assert_eq!(m.phase(), Phase::Fenced);
    assert_eq!(m.renewing(), None);
    // Stopped again after a pause, and again: fenced once, not per try.
    assert_eq!(m.next_wake(), Some(t0 + ms(1600)));
    let again = vec![Action::Stop { graceful: false }];
    assert_eq!(m.on(Event::Tick, t0 + ms(1600)), again);
    let out = m.on(Event::Done(Op::Stop, Err("still".into())), t0 + ms(1700));
    assert_eq!(out, vec![]);
    // The group moves on to another owner meanwhile: still fenced, still
    // stopping (the address may still be here).
    m.on(view(false, 2, true, false), t0 + ms(2000));
    assert_eq!(m.phase(), Phase::Fenced);
    assert_eq!(m.on(Event::Tick, t0 + ms(2700)), again);
    // Done at last: the fence is lifted, nothing to release (not ours).
    let out = m.on(Event::Done(Op::Stop, Ok(())), t0 + ms(2800));
    assert_eq!(out, vec![Action::Unfence]);
    assert_eq!(m.phase(), Phase::Idle);
    // Ours again later: it claims and starts as usual.
    m.on(mine(3), t0 + ms(3000));
    let out = m.on(Event::Lease(Some(t0 + ms(3600))), t0 + ms(3000));
    assert_eq!(out, vec![Action::Claim]);
}

#[test]
fn a_stop_that_succeeds_on_a_retry_releases_the_epoch_it_still_holds() {
    let t0 = Instant::now();
    let mut m = online(t0);
    m.on(revoked(), t0 + ms(100));
    m.on(Event::Done(Op::Stop, Err("hung".into())), t0 + ms(200));
    m.on(Event::Tick, t0 + ms(1200));
    let out = m.on(Event::Done(Op::Stop, Ok(())), t0 + ms(1300));
    assert_eq!(out[0], Action::Unfence);
    assert_eq!(m.phase(), Phase::Done);
}

#[test]
fn the_start_waits_until_no_other_host_holds_the_resources() {
    let t0 = Instant::now();
    let mut m = Machine::new(S);
    m.on(mine(1), t0);
    assert_eq!(
        m.on(Event::Lease(Some(t0 + ms(600))), t0),
        vec![Action::Claim]
    );
    // Still answered for elsewhere (a frozen former owner's kernel):
    // reported once, claimed again shortly, never started meanwhile.
    let held = |why: &str| Event::Done(Op::Claim, Err(why.into()));
    let out = m.on(held("answered by 02:00:00:00:00:09"), t0 + ms(120));
    assert_eq!(reports(&out), [GroupStatus::Starting]);
    assert!(!out.iter().any(|a| matches!(a, Action::Start { .. })));
    assert_eq!(m.next_wake(), Some(t0 + ms(170)));
    assert_eq!(m.on(Event::Tick, t0 + ms(170)), vec![Action::Claim]);
    let out = m.on(held("answered"), t0 + ms(290));
    assert_eq!(out, vec![], "reported once per wait");
    m.on(Event::Lease(Some(t0 + ms(1000))), t0 + ms(340));
    m.on(Event::Tick, t0 + ms(340));
    // Free now: it starts.
    let out = claimed(&mut m, t0 + ms(460));
    assert!(matches!(out.last(), Some(Action::Start { .. })), "{out:?}");
}

#[test]
fn resources_held_elsewhere_for_longer_than_the_start_timeout_fail_the_group_here() {
    let t0 = Instant::now();
    let mut m = Machine::new(Settings {
        start_timeout: ms(300),
        ..S
    });
    m.on(mine(1), t0);
    m.on(Event::Lease(Some(t0 + ms(600))), t0);
    let held = || Event::Done(Op::Claim, Err("answered".into()));
    m.on(held(), t0 + ms(100));
    m.on(Event::Tick, t0 + ms(150));
    let out = m.on(held(), t0 + ms(400));
    assert_eq!(reports(&out), [GroupStatus::Failed]);
    assert_eq!(m.phase(), Phase::Done);
}

#[test]
fn a_claim_in_flight_never_holds_up_a_revocation() {
    let t0 = Instant::now();
    let mut m = Machine::new(S);
    m.on(mine(1), t0);
    assert_eq!(
        m.on(Event::Lease(Some(t0 + ms(600))), t0),
        vec![Action::Claim]
    );
    // A claim has no effect: nothing to stop, released at once.
    let out = m.on(revoked(), t0 + ms(10));
    assert_eq!(reports(&out), [GroupStatus::Offline]);
    assert!(!m.busy());
    // Its late answer changes nothing.
    assert_eq!(claimed(&mut m, t0 + ms(100)), vec![]);
}

#[test]
fn changes_during_an_operation_wait_for_it() {
    let t0 = Instant::now();
    let mut m = Machine::new(S);
    m.on(mine(1), t0);
    m.on(Event::Lease(Some(t0 + ms(600))), t0);
    claimed(&mut m, t0);
    let revoked = revoked();
    assert_eq!(m.on(revoked, t0 + ms(5)), vec![], "the start is in flight");
    let out = m.on(Event::Done(Op::Start, Ok(())), t0 + ms(10));
    assert!(
        out.iter().any(|a| matches!(a, Action::Stop { .. })),
        "then it stops: {out:?}"
    );
}

#[test]
fn a_handover_before_starting_releases_without_a_stop() {
    let t0 = Instant::now();
    let mut m = Machine::new(S);
    m.on(mine(1), t0);
    let out = m.on(draining(), t0);
    assert_eq!(reports(&out), [GroupStatus::Offline]);
    assert!(!out.iter().any(|a| matches!(a, Action::Stop { .. })));
}

#[test]
fn a_check_in_flight_never_holds_up_the_stop_at_lease_end() {
    let t0 = Instant::now();
    let mut m = online(t0);
    let lease = Event::Lease(Some(t0 + ms(2600)));
    m.on(lease, t0 + ms(2000));
    // The check at 2 s hangs; the lease is not renewed.
    assert_eq!(m.on(Event::Tick, t0 + ms(2010)), vec![Action::Check]);
    assert_eq!(m.next_wake(), Some(t0 + ms(2500)));
    let out = m.on(Event::Tick, t0 + ms(2500));
    assert_eq!(out, vec![Action::Stop { graceful: false }]);
    // The check's late answer changes nothing; the stop's does.
    let late = Event::Done(Op::Check, Err("timed out".into()));
    assert_eq!(m.on(late, t0 + ms(3000)), vec![]);
    assert!(m.busy());
    m.on(Event::Done(Op::Stop, Ok(())), t0 + ms(3010));
    assert_eq!(m.phase(), Phase::Waiting);
}

#[test]
fn a_late_report_speaks_for_the_epoch_it_stopped() {
    let t0 = Instant::now();
    let mut m = online(t0);
    m.on(revoked(), t0 + ms(100));
    // Epoch 2 is ours before the stop of epoch 1 has ended.
    m.on(mine(2), t0 + ms(150));
    let out = m.on(Event::Done(Op::Stop, Ok(())), t0 + ms(200));
    let released = Action::Report(1, GroupStatus::Offline, "the epoch was taken back".into());
    assert_eq!(out, vec![released], "releases epoch 1, not 2");
    // And epoch 2 goes ahead.
    assert_eq!(m.phase(), Phase::Waiting);
    assert_eq!(m.renewing(), Some(2));
}

#[test]
fn a_claim_is_good_only_for_the_start_right_after_it() {
    let t0 = Instant::now();
    let mut m = Machine::new(S);
    m.on(mine(1), t0);
    assert_eq!(
        m.on(Event::Lease(Some(t0 + ms(600))), t0),
        vec![Action::Claim]
    );
    // The lease is too short to start by the time the claim answers.
    assert_eq!(m.on(Event::Lease(Some(t0 + ms(150))), t0 + ms(10)), vec![]);
    assert_eq!(
        claimed(&mut m, t0 + ms(120)),
        vec![],
        "no start on a short lease"
    );
    // Seconds later the lease holds again: another host may have taken
    // the address meanwhile, so it claims again first.
    let out = m.on(Event::Lease(Some(t0 + ms(5600))), t0 + ms(5000));
    assert_eq!(out, vec![Action::Claim]);
}
