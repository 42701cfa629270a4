//! Failover time of a VIP group, measured from the client's side: three
//! nodes and a client in network namespaces on one bridge (the lab of
//! tests/netns.rs), the netlink provider, default group timings. Each run
//! strikes the VIP's owner and polls the VIP from the client until a new
//! node greets with 220; then the owner comes back and rejoins. FAULT
//! says how it is struck:
//! - `kill` (default): SIGKILL, then `mtad release` as systemd's
//!   ExecStopPost would;
//! - `kill-norelease`: SIGKILL alone: the kernel drops the address when
//!   its lifetime runs out;
//! - `freeze`: SIGSTOP (SIGCONT once another node greets);
//! - `partition`: cut off from the other nodes, not from the client
//!   (healed once another node greets).
//!
//! Mail goes through the VIP all along; at the end every acknowledged
//! message must have reached the sink.
//!
//! Needs root. Run: `cargo bench --bench failover` (RUNS=n to change the
//! count, default 20; MTAD_BENCH_LOGS=DIR keeps each node's info log in
//! DIR/NAME.log for a timeline). Results go to BENCHMARKS.md.

#[path = "../tests/common/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "../tests/common/netns.rs"]
#[allow(dead_code)]
mod netns;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netns::{node_config, Lab, NODES, SINK, VIP};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn config(dir: &Path, name: &str, last: u8) -> PathBuf {
    let level = if logs().is_some() { "info" } else { "warn" };
    node_config(dir, name, last, "", level)
}

fn start(lab: &Lab, name: &str, cfg: &Path) -> Child {
    let mut argv = lab.exec(name);
    argv.push(env!("CARGO_BIN_EXE_mtad").into());
    Command::new(&argv[0])
        .args(&argv[1..])
        .args(["run", "--config"])
        .arg(cfg)
        .stdout(match logs() {
            Some(dir) => {
                let path = Path::new(&dir).join(format!("{name}.log"));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path);
                Stdio::from(file.unwrap())
            }
            None => Stdio::null(),
        })
        .spawn()
        .unwrap()
}

fn logs() -> Option<String> {
    std::env::var("MTAD_BENCH_LOGS").ok()
}

fn release(lab: &Lab, name: &str, cfg: &Path) {
    let out = lab.mtad(name, &["release", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "mtad release failed on {name}: {out:?}"
    );
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// From inside the client namespace, the node that greets on the VIP
/// once it is not `not` (see `mtad::demo::greeted_by_other`).
async fn greeted_by_other(not: Option<&str>) -> String {
    let vip = SocketAddr::from((VIP, 25));
    mtad::demo::greeted_by_other(vip, not).await.unwrap()
}

/// Whether `name` leads the cluster, per `ctl nodes` on `on`.
fn leads(lab: &Lab, on: &str, name: &str) -> bool {
    lab.nodes(on)
        .iter()
        .any(|r| r["name"] == name && r["leader"] == true)
}

/// A minimal sink counting messages by subject.
async fn sink(got: Arc<Mutex<std::collections::BTreeSet<u64>>>) {
    let listener = tokio::net::TcpListener::bind(SINK).await.unwrap();
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let got = got.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            let _ = w.write_all(b"220 sink\r\n").await;
            let (mut line, mut in_data) = (String::new(), false);
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                let reply: &[u8] = if in_data {
                    if let Some(n) = line.strip_prefix("Subject: m") {
                        if let Ok(n) = n.trim().parse() {
                            got.lock().unwrap().insert(n);
                        }
                    }
                    if line == ".\r\n" {
                        in_data = false;
                        b"250 ok\r\n"
                    } else {
                        b""
                    }
                } else if line.to_ascii_uppercase().starts_with("DATA") {
                    in_data = true;
                    b"354 go\r\n"
                } else {
                    b"250 ok\r\n"
                };
                if !reply.is_empty() && w.write_all(reply).await.is_err() {
                    break;
                }
                line.clear();
            }
        });
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let fault = std::env::var("FAULT").unwrap_or_else(|_| "kill".into());
    let names: Vec<&str> = NODES
        .iter()
        .map(|(n, _)| *n)
        .chain(["client", "sink"])
        .collect();
    let lab = Lab::new(&names, &[1, 2, 3, 10, 20]).expect("network namespaces (run as root)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.key"),
        "failover bench secret, long enough",
    )
    .unwrap();
    let got = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    {
        let got = got.clone();
        lab.within("sink", move || rt().block_on(sink(got)));
    }
    let cfgs: Vec<PathBuf> = NODES
        .iter()
        .map(|(n, l)| config(dir.path(), n, *l))
        .collect();
    let mut procs: Vec<Child> = NODES
        .iter()
        .zip(&cfgs)
        .map(|((n, _), c)| start(&lab, n, c))
        .collect();
    lab.until_voting("n1", 3);
    let first = lab
        .within("client", || rt().block_on(greeted_by_other(None)))
        .join()
        .unwrap();
    eprintln!("VIP up on {first}");

    // Mail through the VIP all along; remember what was acknowledged.
    let (stop, acked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, acked, sent) = (stop.clone(), acked.clone(), sent.clone());
        lab.within("client", move || {
            rt().block_on(async move {
                let vip = SocketAddr::from((VIP, 25));
                while !stop.load(Ordering::SeqCst) {
                    let n = sent.fetch_add(1, Ordering::SeqCst);
                    let attempt = async {
                        let mut c = client::Client::connect(vip).await.ok()?;
                        let body = format!("Subject: m{n}\r\n\r\nx\r\n");
                        c.send("a@example.test", &["b@dest.example"], &body)
                            .await
                            .ok()
                    };
                    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                        Ok(Some(r)) if r.starts_with("250") => acked.lock().unwrap().push(n),
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
    };

    // (took, the owner also led the cluster)
    let mut times: Vec<(Duration, bool)> = Vec::new();
    let mut owner = first;
    for run in 0..runs {
        let name = owner.clone();
        let i = NODES.iter().position(|(n, _)| *n == name).unwrap();
        let other = NODES.iter().find(|(n, _)| *n != name).unwrap().0;
        // An owner that leads hands leadership to a node that owns nothing
        // (within about a second and a half): the steady state is measured,
        // and the table says when the owner still led all the same.
        let settle = mtad::clock::instant() + Duration::from_secs(5);
        while leads(&lab, other, &name) && mtad::clock::instant() < settle {
            std::thread::sleep(Duration::from_millis(50));
        }
        let leader = leads(&lab, other, &name);
        let ip = format!("198.18.0.{}", NODES[i].1);
        let peers: Vec<(&str, String)> = NODES
            .iter()
            .filter(|(n, _)| *n != name)
            .map(|(n, l)| (*n, format!("198.18.0.{l}")))
            .collect();
        let peers: Vec<(&str, &str)> = peers.iter().map(|(n, a)| (*n, a.as_str())).collect();
        let signal = |child: &Child, sig| {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(child.id() as i32, sig) };
        };
        let t0 = mtad::clock::instant();
        match fault.as_str() {
            "kill" | "kill-norelease" => {
                procs[i].kill().unwrap();
                procs[i].wait().unwrap();
                if fault == "kill" {
                    release(&lab, &name, &cfgs[i]);
                }
            }
            "freeze" => signal(&procs[i], libc::SIGSTOP),
            "partition" => lab.cut((&name, &ip), &peers),
            other => panic!("FAULT={other}: kill, kill-norelease, freeze or partition"),
        }
        let next = {
            let not = name.clone();
            lab.within("client", move || {
                rt().block_on(greeted_by_other(Some(&not)))
            })
            .join()
            .unwrap()
        };
        let took = t0.elapsed();
        eprintln!(
            "run {run}: {name} (leader: {leader}) struck ({fault}), {next} greets after {took:?}"
        );
        times.push((took, leader));
        match fault.as_str() {
            "freeze" => signal(&procs[i], libc::SIGCONT),
            "partition" => lab.heal((&name, &ip), &peers),
            _ => procs[i] = start(&lab, &name, &cfgs[i]),
        }
        // Let it rejoin and be published up before the next kill.
        lab.until_voting(&next, 3);
        // A restarted voter holds back its answers about leases for one
        // lease (it may have granted one it forgot): a kill inside that
        // window measures the restart, not the failover.
        std::thread::sleep(Duration::from_secs(1));
        owner = next;
    }
    stop.store(true, Ordering::SeqCst);
    sender.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    let deadline = mtad::clock::instant() + Duration::from_secs(60);
    let missing = loop {
        let have = got.lock().unwrap().clone();
        let missing: Vec<u64> = acked
            .iter()
            .filter(|n| !have.contains(n))
            .copied()
            .collect();
        if missing.is_empty() || mtad::clock::instant() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for p in &mut procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("FAULT={fault}");
    println!("| owner struck | failovers | median | max | min |\n|---|---|---|---|---|");
    for (label, pick) in [
        ("any", None),
        ("a follower", Some(false)),
        ("the raft leader", Some(true)),
    ] {
        let mut v: Vec<Duration> = times
            .iter()
            .filter(|(_, l)| pick.is_none_or(|p| p == *l))
            .map(|(t, _)| *t)
            .collect();
        if v.is_empty() {
            continue;
        }
        v.sort();
        println!(
            "| {label} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            v.len(),
            ms(v[v.len() / 2]),
            ms(*v.last().unwrap()),
            ms(v[0])
        );
    }
    println!(
        "messages: {} sent, {} acknowledged, {} acknowledged and not delivered",
        sent.load(Ordering::SeqCst),
        acked.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "acknowledged and lost: {missing:?}");
}
