//! Operator queries on a large queue: a million messages to 100
//! destinations, every one deferred once; then the calls `mtad ctl queue`
//! makes — a page from the start, from the middle and from the end, a
//! filtered page, the per-destination summary, one message shown — timed
//! in the queue core, where the driver answers them between two events
//! (the admin HTTP hop adds well under a millisecond on loopback).
//! Run with `cargo bench --bench queue`; MESSAGES=n to change the size.
//! Results go to BENCHMARKS.md.

use std::time::Duration;

use mtad::config::load_str;
use mtad::delivery::{JobResult, Outcome, RcptResult};
use mtad::queue::core::Core;
use mtad::queue::ops::{parse_id, Filter};
use mtad::spool::{Envelope, QueueId, RcptState, Recipient};

const DESTINATIONS: usize = 100;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut last = None;
    let samples = (0..runs)
        .map(|_| {
            let t = mtad::clock::instant();
            last = Some(f());
            t.elapsed()
        })
        .collect();
    (median(samples), last.expect("one run"))
}

fn main() {
    // `cargo test --all-targets` runs bench targets too; only measure
    // when asked to by `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n: u64 = std::env::var("MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut text = String::from("[node]\nname = \"b\"\ndata_dir = \"/nonexistent\"\n");
    for d in 0..DESTINATIONS {
        text.push_str(&format!(
            "[[route]]\ndomains = [\"d{d}.example\"]\nnext_hops = [\"127.0.0.1:{}\"]\n",
            10_000 + d
        ));
    }
    let cfg = load_str(&text, "bench.toml").expect("config");
    let mut core = Core::new();
    let now = tokio::time::Instant::now();
    let mut out = Vec::new();
    let fill = mtad::clock::instant();
    for i in 1..=n {
        let envelope = Envelope {
            id: QueueId(i),
            sender: "s@example.test".into(),
            recipients: vec![Recipient {
                address: format!("u{i}@d{}.example", i as usize % DESTINATIONS),
                state: RcptState::Pending { attempts: 0 },
            }],
            arrived_ms: 1_000_000 + i,
            holders: Vec::new(),
        };
        core.admit(&cfg, envelope, false, now, 0, &mut out);
        let result = JobResult {
            id: QueueId(i),
            route: i as usize % DESTINATIONS,
            next_hop: "127.0.0.1:1".into(),
            results: vec![RcptResult {
                index: 0,
                outcome: Outcome::Deferred,
                reply: "451 4.2.0 mailbox busy".into(),
            }],
        };
        core.result(&cfg, result, now, 0, &mut out);
        out.clear();
    }
    println!(
        "{n} messages queued in {:.1} s",
        fill.elapsed().as_secs_f64()
    );

    let all = Filter::default();
    let page = |after: Option<QueueId>| core.list(&cfg, &all, after, 100);
    let (first, p) = time(21, || page(None));
    assert_eq!(p.messages.len(), 100);
    let (middle, _) = time(21, || page(Some(QueueId(n / 2))));
    let (end, p) = time(21, || page(Some(QueueId(n - 50))));
    assert!(p.next.is_none());
    let one_dest = Filter {
        dest: Some("127.0.0.1:10042".into()),
        state: None,
    };
    let (filtered, p) = time(21, || core.list(&cfg, &one_dest, None, 100));
    assert_eq!(p.messages.len(), 100);
    let next = p.next.as_deref().and_then(parse_id);
    let (filtered_next, _) = time(21, || core.list(&cfg, &one_dest, next, 100));
    let (summary, rows) = time(5, || core.summary(&cfg));
    assert_eq!(rows.len(), DESTINATIONS);
    let (show, d) = time(21, || core.show(&cfg, QueueId(n / 3)));
    assert!(d.is_some());
    let walk = mtad::clock::instant();
    let mut after = None;
    let mut seen = 0;
    loop {
        let p = core.list(&cfg, &all, after, 1000);
        seen += p.messages.len();
        match p.next.as_deref().and_then(parse_id) {
            Some(id) => after = Some(id),
            None => break,
        }
    }
    assert_eq!(seen as u64, n);
    let walk = walk.elapsed();

    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1000.0);
    println!("| query ({n} messages) | median |");
    println!("|---|---|");
    println!("| first page of 100 | {} |", ms(first));
    println!("| page of 100 from the middle | {} |", ms(middle));
    println!("| last page | {} |", ms(end));
    println!(
        "| first page of 100 for one destination of {DESTINATIONS} | {} |",
        ms(filtered)
    );
    println!("| next page for that destination | {} |", ms(filtered_next));
    println!(
        "| summary of {DESTINATIONS} destinations | {} |",
        ms(summary)
    );
    println!("| show one message | {} |", ms(show));
    println!("| every message, in pages of 1000 | {} |", ms(walk));
}
