//! Durable-spool benchmark: mtad's own segment log (`DiskSpool`) against
//! fjall with manual journal persistence, both with the same group commit.
//!
//! One process runs one configuration:
//!
//! ```text
//! spool-compare run <mtad|fjall> <writers> <messages>
//! spool-compare summarize <results.tsv>
//! ```
//!
//! `run` stores `messages` messages from `writers` concurrent tokio tasks,
//! each store awaited until durable; closes the spool; reopens it and times
//! recovery of all of them; then removes every message again from
//! `writers` tasks, each remove awaited until durable. It prints one
//! tab-separated result line (see `HEADER`).
//!
//! fsyncs are counted by interposing `fsync` and `fdatasync` in this
//! binary (see `sync_count`), so every sync either engine makes is
//! counted, background ones included.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mtad::spool::{DiskSpool, Envelope, IdGen, QueueId, RcptState, Recipient, Spool};

mod fjall_spool;
mod sync_count;

use fjall_spool::FjallSpool;

/// Size of every message's content.
const BODY_LEN: usize = 4096;

const HEADER: &str = "engine\twriters\tmessages\tstore_s\tstores_per_s\tsyncs_per_store\tbatches_per_store\trecovery_ms\trecovered\tremove_s\tremoves_per_s\tsyncs_per_remove\tbatches_per_remove";

/// The engine-independent surface the benchmark drives.
trait Engine: Send + Sync + 'static {
    fn store(&self, env: Envelope, body: Bytes) -> impl std::future::Future<Output = ()> + Send;
    fn remove(&self, id: QueueId) -> impl std::future::Future<Output = ()> + Send;
    /// Commit batches (one journal write + one data sync each), if known.
    fn batches(&self) -> Option<u64>;
}

struct Mtad(DiskSpool);

impl Engine for Mtad {
    async fn store(&self, env: Envelope, body: Bytes) {
        self.0.store(env, body).await.expect("mtad store");
    }
    async fn remove(&self, id: QueueId) {
        self.0.remove(id).await.expect("mtad remove");
    }
    fn batches(&self) -> Option<u64> {
        None
    }
}

impl Engine for FjallSpool {
    async fn store(&self, env: Envelope, body: Bytes) {
        FjallSpool::store(self, env, body).await.expect("fjall store");
    }
    async fn remove(&self, id: QueueId) {
        FjallSpool::remove(self, id).await.expect("fjall remove");
    }
    fn batches(&self) -> Option<u64> {
        Some(self.batches())
    }
}

/// A realistic small envelope: a bounce-style sender, 1–3 recipients.
fn envelope(id: QueueId, i: usize) -> Envelope {
    let recipients = (0..1 + i % 3)
        .map(|r| Recipient {
            address: format!("user{}.{}@mx{}.example.com", i, r, i % 17),
            state: RcptState::Pending { attempts: 0 },
        })
        .collect();
    Envelope {
        id,
        sender: format!("newsletter-bounces+{i}@lists.example.org"),
        recipients,
        arrived_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        holders: Vec::new(),
    }
}

fn body(template: &[u8], i: usize) -> Bytes {
    let mut b = template.to_vec();
    // Make every message distinct (defeats any dedup/compression luck).
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Bytes::from(b)
}

struct Phase {
    elapsed: Duration,
    syncs: u64,
    batches: Option<u64>,
}

async fn store_all<E: Engine>(e: Arc<E>, ids: Arc<Vec<QueueId>>, writers: usize) -> Phase {
    // Pseudo-random printable content, fixed for reproducibility.
    let mut seed = 0x2545F4914F6CDD1Du64;
    let template: Arc<Vec<u8>> = Arc::new(
        (0..BODY_LEN)
            .map(|i| {
                if i % 78 == 77 {
                    b'\n'
                } else {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    b' ' + (seed % 94) as u8
                }
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let (syncs0, batches0) = (sync_count::total(), e.batches());
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (e, ids, next, template) = (e.clone(), ids.clone(), next.clone(), template.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ids.len() {
                        break;
                    }
                    e.store(envelope(ids[i], i), body(&template, i)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task");
    }
    Phase {
        elapsed: start.elapsed(),
        syncs: sync_count::total() - syncs0,
        batches: e.batches().zip(batches0).map(|(a, b)| a - b),
    }
}

async fn remove_all<E: Engine>(e: Arc<E>, ids: Arc<Vec<QueueId>>, writers: usize) -> Phase {
    let next = Arc::new(AtomicUsize::new(0));
    let (syncs0, batches0) = (sync_count::total(), e.batches());
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (e, ids, next) = (e.clone(), ids.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ids.len() {
                        break;
                    }
                    e.remove(ids[i]).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("remover task");
    }
    Phase {
        elapsed: start.elapsed(),
        syncs: sync_count::total() - syncs0,
        batches: e.batches().zip(batches0).map(|(a, b)| a - b),
    }
}

/// Wait until an engine dropped by its last `Arc` has finished shutting
/// down (its writer thread holds no file open any more).
fn unwrap_arc<T>(mut a: Arc<T>) -> T {
    loop {
        match Arc::try_unwrap(a) {
            Ok(t) => return t,
            Err(back) => {
                a = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

async fn run(engine: &str, writers: usize, n: usize, dir: &Path) -> String {
    let idgen = IdGen::new(QueueId(0));
    let ids: Arc<Vec<QueueId>> = Arc::new((0..n).map(|_| idgen.next()).collect());
    let per = |p: &Phase| {
        (
            n as f64 / p.elapsed.as_secs_f64(),
            p.syncs as f64 / n as f64,
            p.batches.map_or("-".to_string(), |b| format!("{:.4}", b as f64 / n as f64)),
        )
    };

    let (stored, recovery, recovered, removed) = match engine {
        "mtad" => {
            let e = Arc::new(Mtad(DiskSpool::open(dir).expect("open mtad spool")));
            let stored = store_all(e.clone(), ids.clone(), writers).await;
            drop(unwrap_arc(e));
            // The writer thread exits once its channel closes; give it a
            // moment so the reopen does not race it (it holds no lock, and
            // every record was already durable).
            tokio::time::sleep(Duration::from_millis(50)).await;

            let t = Instant::now();
            let spool = DiskSpool::open(dir).expect("reopen mtad spool");
            let rec = spool.recovered();
            let recovery = t.elapsed();
            let recovered = rec.len();
            drop(rec);

            let e = Arc::new(Mtad(spool));
            let removed = remove_all(e.clone(), ids.clone(), writers).await;
            drop(unwrap_arc(e));
            (stored, recovery, recovered, removed)
        }
        "fjall" => {
            let e = Arc::new(FjallSpool::open(dir).expect("open fjall"));
            let stored = store_all(e.clone(), ids.clone(), writers).await;
            unwrap_arc(e).close();

            let t = Instant::now();
            let (spool, rec) = FjallSpool::open_recover(dir).expect("reopen fjall");
            let recovery = t.elapsed();
            let recovered = rec.len();
            drop(rec);

            let e = Arc::new(spool);
            let removed = remove_all(e.clone(), ids.clone(), writers).await;
            unwrap_arc(e).close();
            (stored, recovery, recovered, removed)
        }
        other => panic!("unknown engine {other:?} (mtad|fjall)"),
    };
    assert_eq!(recovered, n, "{engine}: recovered {recovered} of {n}");

    let (sps, syncs_s, batches_s) = per(&stored);
    let (rps, syncs_r, batches_r) = per(&removed);
    format!(
        "{engine}\t{writers}\t{n}\t{:.3}\t{sps:.0}\t{syncs_s:.4}\t{batches_s}\t{:.1}\t{recovered}\t{:.3}\t{rps:.0}\t{syncs_r:.4}\t{batches_r}",
        stored.elapsed.as_secs_f64(),
        recovery.as_secs_f64() * 1e3,
        removed.elapsed.as_secs_f64(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Medians per (engine, writers) of a file of `run` lines.
fn summarize(path: &Path) {
    let text = std::fs::read_to_string(path).expect("read results");
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.starts_with("engine") && !l.trim().is_empty())
        .map(|l| l.split('\t').collect())
        .collect();
    let mut keys: Vec<(String, usize)> = Vec::new();
    for r in &rows {
        let k = (r[0].to_string(), r[1].parse().unwrap());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
    println!("| engine | writers | runs | stores/s | syncs/store | batches/store | remove/s | syncs/remove | recovery ms (N live) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (engine, w) in keys {
        let sel: Vec<_> = rows
            .iter()
            .filter(|r| r[0] == engine && r[1].parse::<usize>().unwrap() == w)
            .collect();
        let col = |i: usize| median(sel.iter().filter_map(|r| r[i].parse::<f64>().ok()).collect());
        let opt = |i: usize| {
            let v: Vec<f64> = sel.iter().filter_map(|r| r[i].parse::<f64>().ok()).collect();
            if v.is_empty() {
                "=syncs".to_string()
            } else {
                format!("{:.4}", median(v))
            }
        };
        println!(
            "| {engine} | {w} | {} | {:.0} | {:.4} | {} | {:.0} | {:.4} | {:.0} ({}) |",
            sel.len(),
            col(4),
            col(5),
            opt(6),
            col(10),
            col(11),
            col(7),
            sel[0][8],
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("run") if args.len() == 5 => {
            let engine = args[2].as_str();
            let writers: usize = args[3].parse().expect("writers");
            let n: usize = args[4].parse().expect("messages");
            let dir: PathBuf = std::env::temp_dir().join(format!(
                "spool-compare-{engine}-{}-{}",
                std::process::id(),
                writers
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let line = rt.block_on(run(engine, writers, n, &dir));
            drop(rt);
            std::fs::remove_dir_all(&dir).expect("remove temp dir");
            println!("{line}");
        }
        Some("header") => println!("{HEADER}"),
        Some("summarize") if args.len() == 3 => summarize(Path::new(&args[2])),
        _ => {
            eprintln!(
                "usage: spool-compare run <mtad|fjall> <writers> <messages>\n       spool-compare header\n       spool-compare summarize <results.tsv>"
            );
            std::process::exit(2);
        }
    }
}
