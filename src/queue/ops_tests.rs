use super::*;
use crate::queue::core::tests::{config, jobs, message};
use std::time::Duration;

fn outcome(id: u64, indices: &[usize], outcome: Outcome) -> JobResult {
    JobResult {
        id: QueueId(id),
        route: 0,
        next_hop: "127.0.0.1:1".into(),
        results: indices
            .iter()
            .map(|&index| RcptResult {
                index,
                outcome,
                reply: "451 4.3.0 try later".into(),
            })
            .collect(),
    }
}

/// A queue of `n` messages to a.example, every one deferred once.
fn deferred(n: u64) -> (Core, Instant) {
    let cfg = config();
    let mut core = Core::new();
    let now = Instant::now();
    let mut out = Vec::new();
    for id in 1..=n {
        core.admit(&cfg, message(id, &["x@a.example"]), false, now, 0, &mut out);
        core.result(
            &cfg,
            outcome(id, &[0], Outcome::Deferred),
            now,
            5_000,
            &mut out,
        );
    }
    (core, now)
}

/// Message 1 queued for x@ and y@a.example, not yet attempted.
fn two_recipients() -> (Config, Core, Instant, Vec<Action>) {
    let cfg = config();
    let mut core = Core::new();
    let now = Instant::now();
    let mut out = Vec::new();
    let two = message(1, &["x@a.example", "y@a.example"]);
    core.admit(&cfg, two, false, now, 0, &mut out);
    (cfg, core, now, out)
}

fn ids(page: &Page) -> Vec<String> {
    page.messages.iter().map(|m| m.id.clone()).collect()
}

#[test]
fn listing_pages_oldest_first_until_the_last() {
    let cfg = config();
    let (core, _) = deferred(5);
    let all = Filter::default();
    let first = core.list(&cfg, &all, None, 2);
    assert_eq!(ids(&first), ["0000000000000001", "0000000000000002"]);
    let after = first.next.as_deref().and_then(parse_id);
    let second = core.list(&cfg, &all, after, 2);
    assert_eq!(ids(&second), ["0000000000000003", "0000000000000004"]);
    let last = core.list(&cfg, &all, second.next.as_deref().and_then(parse_id), 2);
    assert_eq!(ids(&last), ["0000000000000005"]);
    assert_eq!(last.next, None);
    let row = &first.messages[0];
    assert_eq!(row.state, "deferred");
    assert_eq!(row.attempts, 1);
    assert_eq!(row.destinations, ["127.0.0.1:1"]);
    assert_eq!(row.last_reply.as_deref(), Some("451 4.3.0 try later"));
    assert_eq!(row.next_attempt_ms, Some(5_000 + 60_000));
}

#[test]
fn filters_select_by_destination_and_state() {
    let cfg = config();
    let (mut core, now) = deferred(2);
    let mut out = Vec::new();
    core.admit(&cfg, message(3, &["y@b.example"]), false, now, 0, &mut out);
    let by = |dest: Option<&str>, state: Option<&str>| {
        let f = Filter {
            dest: dest.map(Into::into),
            state: state.map(Into::into),
        };
        ids(&core.list(&cfg, &f, None, 100))
    };
    assert_eq!(by(Some("b.example"), None), ["0000000000000003"]);
    assert_eq!(
        by(Some("A.EXAMPLE."), None).len(),
        2,
        "domains match loosely"
    );
    assert_eq!(by(Some("127.0.0.1:1"), None).len(), 2, "and routes by name");
    assert_eq!(by(None, Some("active")), ["0000000000000003"]);
    assert_eq!(by(None, Some("deferred")).len(), 2);
    assert!(by(None, Some("held")).is_empty());
}

#[test]
fn hold_stops_dispatch_until_release_and_flush_retries_now() {
    let cfg = config();
    let (mut core, now) = deferred(2);
    let one = [QueueId(1)];
    let mut out = Vec::new();
    assert_eq!(core.act(&cfg, Op::Hold, &one, now, 0, &mut out), 1);
    assert_eq!(core.act(&cfg, Op::Hold, &one, now, 0, &mut out), 0, "once");
    assert_eq!(core.held(), one);
    // Its retry is cancelled: when it would be due, only message 2 goes.
    core.due(&cfg, now + Duration::from_secs(3600), 0, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    out.clear();
    // A held message is not flushed; a release dispatches it at once.
    assert_eq!(core.act(&cfg, Op::Flush, &one, now, 0, &mut out), 0);
    assert_eq!(core.act(&cfg, Op::Release, &one, now, 0, &mut out), 1);
    assert_eq!(jobs(&out), [(0, vec![0])]);
    assert!(core.held().is_empty());

    // Flush: a deferred message goes now, not at its retry time.
    let (mut core, now) = deferred(1);
    out.clear();
    assert_eq!(core.act(&cfg, Op::Flush, &one, now, 0, &mut out), 1);
    assert_eq!(jobs(&out), [(0, vec![0])]);
    assert_eq!(core.next_due(), None, "the retry it replaced is gone");
    assert_eq!(
        core.act(&cfg, Op::Flush, &one, now, 0, &mut out),
        0,
        "in flight"
    );
}

#[test]
fn a_deferral_while_held_waits_for_the_release() {
    let cfg = config();
    let mut core = Core::new();
    let now = Instant::now();
    let mut out = Vec::new();
    core.admit(&cfg, message(1, &["x@a.example"]), false, now, 0, &mut out);
    core.act(&cfg, Op::Hold, &[QueueId(1)], now, 0, &mut out);
    let in_flight = core.list(&cfg, &Filter::default(), None, 10);
    assert_eq!(in_flight.messages[0].state, "held");
    core.result(&cfg, outcome(1, &[0], Outcome::Deferred), now, 0, &mut out);
    assert_eq!(core.next_due(), None, "no retry while held");
    out.clear();
    core.act(&cfg, Op::Release, &[QueueId(1)], now, 0, &mut out);
    assert_eq!(jobs(&out), [(0, vec![0])]);
}

#[test]
fn delete_forgets_and_bounce_fails_every_pending_recipient() {
    let cfg = config();
    let (mut core, now) = deferred(2);
    let mut out = Vec::new();
    assert_eq!(
        core.act(&cfg, Op::Delete, &[QueueId(1)], now, 0, &mut out),
        1
    );
    assert!(matches!(
        &out[..],
        [Action::Settle { finished: true, bounce, .. }] if bounce.is_empty()
    ));
    assert_eq!(core.len(), 1);
    assert_eq!(core.show(&cfg, QueueId(1)), None);
    out.clear();
    assert_eq!(
        core.act(&cfg, Op::Bounce, &[QueueId(2)], now, 0, &mut out),
        1
    );
    match &out[..] {
        [Action::Settle {
            finished: true,
            bounce,
            ..
        }] => {
            assert_eq!(bounce.len(), 1);
            assert!(bounce[0].reply.starts_with("550 5.0.0"), "{bounce:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(core.is_empty());
    assert_eq!(core.next_due(), None, "no retry outlives its message");
}

#[test]
fn a_selector_names_ids_a_filter_or_all_never_nothing_by_accident() {
    let cfg = config();
    let (core, _) = deferred(2);
    let sel = |ids: &[&str], all: bool| Selector {
        ids: ids.iter().map(|s| s.to_string()).collect(),
        filter: Filter::default(),
        all,
    };
    assert!(core.select(&cfg, &sel(&[], false)).is_err());
    assert_eq!(core.select(&cfg, &sel(&[], true)).unwrap().len(), 2);
    assert_eq!(core.select(&cfg, &sel(&["1"], false)), Ok(vec![QueueId(1)]));
    let missing = core.select(&cfg, &sel(&["1", "99"], false)).unwrap_err();
    assert!(missing.contains("99"), "{missing}");
    assert!(core.select(&cfg, &sel(&["zz"], false)).is_err());
}

#[test]
fn summary_counts_per_destination_with_the_latest_error() {
    let cfg = config();
    let (mut core, now) = deferred(3);
    let mut out = Vec::new();
    core.admit(
        &cfg,
        message(9, &["y@b.example", "z@b.example"]),
        false,
        now,
        0,
        &mut out,
    );
    core.act(&cfg, Op::Hold, &[QueueId(2)], now, 0, &mut out);
    let rows = core.summary(&cfg);
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["/tmp/x", "127.0.0.1:1"]);
    let a = &rows[1];
    assert_eq!((a.messages, a.recipients, a.deferred, a.held), (3, 3, 3, 1));
    assert_eq!(a.oldest_ms, 1_000_001);
    assert_eq!(a.last_error.as_deref(), Some("451 4.3.0 try later"));
    let b = &rows[0];
    assert_eq!((b.messages, b.recipients, b.deferred), (1, 2, 0));
    assert_eq!(b.last_error, None);
}

#[test]
fn show_tells_each_recipient_apart() {
    let (cfg, mut core, now, mut out) = two_recipients();
    let mut r = outcome(1, &[0], Outcome::Delivered);
    r.results[0].reply = "250 ok".into();
    core.result(&cfg, r, now, 7, &mut out);
    let d = core.show(&cfg, QueueId(1)).unwrap();
    let states: Vec<&str> = d.recipients.iter().map(|r| r.state.as_str()).collect();
    assert_eq!(states, ["done", "in flight"]);
    assert_eq!(d.message.state, "active");
    assert_eq!(d.last_hop, None, "a delivery is not an error");
}

/// The million-message queue: every page is at most MAX_PAGE
/// rows, a walk by cursor visits each message once, in order, and a page
/// from deep in the queue starts right after the cursor. (How fast is
/// measured in benches/queue.rs, not here.)
#[test]
fn a_million_messages_list_in_pages() {
    let cfg = config();
    let mut core = Core::new();
    let now = Instant::now();
    let mut out = Vec::new();
    let n: u64 = 1_000_000;
    for id in 1..=n {
        core.admit(&cfg, message(id, &["x@a.example"]), false, now, 0, &mut out);
        out.clear();
    }
    let all = Filter::default();
    let deep = core.list(&cfg, &all, Some(QueueId(n - 10)), 100_000);
    assert_eq!(deep.messages.len(), 10);
    assert_eq!(deep.messages[0].id, QueueId(n - 9).to_string());
    let (mut after, mut seen, mut pages) = (None, 0u64, 0);
    loop {
        let page = core.list(&cfg, &all, after, usize::MAX);
        assert!(page.messages.len() <= MAX_PAGE);
        let first = parse_id(&page.messages[0].id).unwrap();
        assert_eq!(first, QueueId(seen + 1), "no gap, no repeat");
        seen += page.messages.len() as u64;
        pages += 1;
        match page.next.as_deref().and_then(parse_id) {
            Some(id) => after = Some(id),
            None => break,
        }
    }
    assert_eq!((seen, pages), (n, 1000));
}

/// Bouncing a message whose recipients are being delivered: one the
/// attempt delivers stays delivered (no false DSN), one it defers is
/// returned to the sender instead of retried.
#[test]
fn a_bounce_leaves_recipients_in_flight_to_their_attempt() {
    let (cfg, mut core, now, mut out) = two_recipients();
    out.clear();
    assert_eq!(
        core.act(&cfg, Op::Bounce, &[QueueId(1)], now, 0, &mut out),
        1
    );
    assert!(
        out.is_empty(),
        "both in flight: nothing decided yet: {out:?}"
    );
    let mut r = outcome(1, &[0, 1], Outcome::Deferred);
    r.results[0].outcome = Outcome::Delivered;
    r.results[0].reply = "250 ok".into();
    core.result(&cfg, r, now, 0, &mut out);
    match &out[..] {
        [Action::Settle {
            bounce,
            finished: true,
            ..
        }] => {
            assert_eq!(bounce.len(), 1, "{bounce:?}");
            assert_eq!(bounce[0].address, "y@a.example");
            assert!(
                bounce[0].reply.starts_with("550 5.0.0 Returned"),
                "{bounce:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(core.next_due(), None);
}
