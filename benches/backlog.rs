//! A million-message backlog behind a dead next hop, in the durable spool:
//! every message stored (group commit, 512 in flight), then deferred once
//! (an update record each, as a failed attempt writes), and kept. Then,
//! with that backlog in place, more traffic that is delivered at once —
//! the case where compaction used to copy a whole segment per commit —
//! and the bytes written per byte stored; then a restart: how long the
//! spool takes to recover the backlog and the memory it then holds.
//!
//! Run with `cargo bench --bench backlog` (MESSAGES, default 1,000,000;
//! SIZE, default 1024 bytes; DIR, where the spool goes, default a temp
//! dir). Results go to BENCHMARKS.md.

use std::sync::Arc;

use bytes::Bytes;
use mtad::spool::disk::DiskSpool;
use mtad::spool::{Envelope, QueueId, RcptState, Recipient, Spool};

const IN_FLIGHT: u64 = 512;

fn envelope(id: u64) -> Envelope {
    Envelope {
        id: QueueId(id),
        sender: format!("sender{id}@example.test"),
        recipients: vec![Recipient {
            address: format!("rcpt{}@dead.example", id % 1000),
            state: RcptState::Pending { attempts: 0 },
        }],
        arrived_ms: 1,
        holders: Vec::new(),
    }
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Run `op` for every id in `ids`, `IN_FLIGHT` at a time.
async fn each(
    spool: &Arc<DiskSpool>,
    ids: std::ops::RangeInclusive<u64>,
    op: impl Fn(Arc<DiskSpool>, u64) -> tokio::task::JoinHandle<()>,
) {
    let mut pending = Vec::new();
    for id in ids {
        pending.push(op(spool.clone(), id));
        if pending.len() as u64 >= IN_FLIGHT {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n: u64 = std::env::var("MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let size: usize = std::env::var("SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let tmp = tempfile::tempdir_in(std::env::var("DIR").unwrap_or_else(|_| "/tmp".into())).unwrap();
    let dir = tmp.path().join("spool");
    let body = Bytes::from(vec![b'x'; size]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let spool = Arc::new(DiskSpool::open(&dir).unwrap());
        let t = mtad::clock::instant();
        let b = body.clone();
        each(&spool, 1..=n, move |s, id| {
            let b = b.clone();
            tokio::spawn(async move { s.store(envelope(id), b).await.unwrap() })
        })
        .await;
        let stored = t.elapsed();
        let t = mtad::clock::instant();
        each(&spool, 1..=n, |s, id| {
            tokio::spawn(async move {
                let deferred = vec![(0, RcptState::Pending { attempts: 1 })];
                s.update(QueueId(id), deferred).await.unwrap()
            })
        })
        .await;
        let deferred = t.elapsed();
        let backlog_disk = spool.bytes_on_disk();
        println!(
            "backlog: {n} messages of {size} bytes stored in {:.1} s ({:.0}/s), deferred in {:.1} s; spool {:.0} MiB on disk",
            stored.as_secs_f64(),
            n as f64 / stored.as_secs_f64(),
            deferred.as_secs_f64(),
            backlog_disk as f64 / (1 << 20) as f64
        );
        // Traffic behind the backlog, delivered at once.
        let extra = (n / 10).max(10_000);
        let written = spool.bytes_written();
        let t = mtad::clock::instant();
        let b = body.clone();
        each(&spool, n + 1..=n + extra, move |s, id| {
            let b = b.clone();
            tokio::spawn(async move {
                s.store(envelope(id), b).await.unwrap();
                s.remove(QueueId(id)).await.unwrap();
            })
        })
        .await;
        let took = t.elapsed();
        let amplification =
            (spool.bytes_written() - written) as f64 / (extra as f64 * size as f64);
        println!(
            "behind it: {extra} more stored and removed in {:.1} s ({:.0}/s); {amplification:.2} bytes written per byte stored; spool {:.0} MiB on disk",
            took.as_secs_f64(),
            extra as f64 / took.as_secs_f64(),
            spool.bytes_on_disk() as f64 / (1 << 20) as f64
        );
    });
    drop(rt);
    let before = rss_mib();
    let t = mtad::clock::instant();
    let spool = DiskSpool::open(&dir).unwrap();
    println!(
        "restart: {} messages recovered in {:.1} s; resident memory {:.0} MiB (was {before:.0} MiB before opening)",
        spool.recovered().len(),
        t.elapsed().as_secs_f64(),
        rss_mib()
    );
}
