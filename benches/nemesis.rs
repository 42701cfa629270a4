//! The nemesis, long: several seeds of random faults against three real
//! nodes in network namespaces (see tests/common/nemesis.rs), then a
//! Markdown table for BENCHMARKS.md: faults injected by kind, VIP
//! ownership violations seen on the wire, acknowledged messages lost,
//! duplicates, and how long the cluster took to heal.
//!
//! Needs root and nftables. Run:
//! `cargo bench --bench nemesis` — MINUTES (default 30) split over SEEDS
//! (default "1,2,3"). Exit status 1 if any run lost mail or saw two
//! owners.

#[path = "../tests/common/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "../tests/common/daemon.rs"]
#[allow(dead_code)]
mod daemon;
#[path = "../tests/common/lab.rs"]
#[allow(dead_code)]
mod lab;
#[path = "../tests/common/loopfs.rs"]
#[allow(dead_code)]
mod loopfs;
#[path = "../tests/common/nemesis.rs"]
#[allow(dead_code)]
mod nemesis;
#[path = "../tests/common/netns.rs"]
#[allow(dead_code)]
mod netns;
#[path = "../tests/common/node.rs"]
#[allow(dead_code)]
mod node;
#[path = "../tests/common/wire.rs"]
#[allow(dead_code)]
mod wire;

use std::collections::BTreeMap;
use std::time::Duration;

fn main() {
    // `cargo test --all-targets` runs benches without --bench: nothing.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let minutes: u64 = std::env::var("MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(30);
    let seeds: Vec<u64> = std::env::var("SEEDS")
        .unwrap_or_else(|_| "1,2,3".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let each = Duration::from_secs(minutes * 60 / seeds.len().max(1) as u64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut reports = Vec::new();
    for &seed in &seeds {
        let dir = tempfile::tempdir().unwrap();
        let r = runtime.block_on(nemesis::run(seed, each, dir.path()));
        eprintln!("{r:#?}");
        reports.push(r);
    }
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    println!("| seed | faulting | faults | acknowledged | lost | duplicates | two owners | healed after |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &reports {
        for (k, n) in &r.faults {
            *faults.entry(k).or_default() += n;
        }
        println!(
            "| {} | {} min | {} | {} | {} | {} | {} | {:.1} s |",
            r.seed,
            each.as_secs() / 60,
            r.faults.values().sum::<usize>(),
            r.acknowledged,
            r.lost.len(),
            r.duplicates,
            r.doubles.len(),
            r.healed_after.as_secs_f64()
        );
    }
    println!();
    for (k, n) in &faults {
        println!("- {k}: {n}");
    }
    let bad = reports
        .iter()
        .any(|r| !r.lost.is_empty() || !r.doubles.is_empty());
    std::process::exit(i32::from(bad));
}
