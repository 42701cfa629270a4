//! The nemesis: a seeded random schedule of faults against three real
//! `mtad` processes in the namespace lab, while a client streams mail to
//! the VIP, and an observer outside the nodes that checks the invariants
//! the way Jepsen checks databases:
//!
//! - **one owner**: every ARP frame claiming the VIP is recorded on the
//!   bridge (see `wire`); no two MACs may answer at once;
//! - **nothing lost**: after the faults heal, every message the client got
//!   a 250 for reaches the sink (duplicates are counted);
//! - **healing**: within a bound after the last fault, all three members
//!   are up and voting and the group is online.
//!
//! Faults, one at a time so that a majority always remains: `kill -9`
//! (with or without the `mtad release` systemd would run) and a restart,
//! sometimes on a wiped data directory (a node whose disk died: its
//! acknowledged mail lives on only in its shadow copies);
//! SIGSTOP for 1-15 s; a partition of one node from the others, both ways
//! or one way, with the client on either side; random packet loss on one
//! node; a full disk under one node's data directory (each is a small
//! ext4 filesystem of its own). (Delay is not injected: this kernel has
//! no netem.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::daemon::Daemon;
use super::lab::{Received, CLIENT};
use super::loopfs::LoopFs;
use super::netns::{node_config, Lab, NODES, VIP};
use super::wire::{self, Double};

/// How long the cluster may take to heal after the last fault.
pub const HEAL_WITHIN: Duration = Duration::from_secs(60);
/// How long acknowledged mail may take to arrive once healed.
pub const DELIVER_WITHIN: Duration = Duration::from_secs(120);

/// A small, seeded generator (xorshift64*): the same seed, the same
/// schedule.
pub struct Rng(u64);

impl Rng {
    /// Seeded; 0 is moved off the fixed point.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// In `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Between `a` and `b` milliseconds.
    fn millis(&mut self, a: u64, b: u64) -> Duration {
        Duration::from_millis(a + self.below(b - a + 1))
    }
}

/// One fault, on node `NODES[node]`.
#[derive(Debug, Clone)]
pub enum Fault {
    /// SIGKILL, `mtad release` if `release`, everything on its disk
    /// deleted if `wipe`, restart after `down`.
    Kill {
        node: usize,
        release: bool,
        wipe: bool,
        down: Duration,
    },
    /// SIGSTOP, SIGCONT after `for_`.
    Pause { node: usize, for_: Duration },
    /// Cut the node off from the other nodes for `for_`: both ways or
    /// only what it receives; the client is cut off too unless `client`.
    Partition {
        node: usize,
        one_way: bool,
        client: bool,
        for_: Duration,
    },
    /// Drop `percent` of the node's packets, both ways, for `for_`.
    Loss {
        node: usize,
        percent: u64,
        for_: Duration,
    },
    /// Fill the node's disk for `for_`.
    DiskFull { node: usize, for_: Duration },
}

impl Fault {
    /// Its kind, for counts.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { wipe: true, .. } => "kill -9, disk wiped",
            Fault::Kill { release: true, .. } => "kill -9 (released)",
            Fault::Kill { .. } => "kill -9",
            Fault::Pause { .. } => "SIGSTOP",
            Fault::Partition { one_way: true, .. } => "partition, one way",
            Fault::Partition { client: true, .. } => "partition, client with the node",
            Fault::Partition { .. } => "partition, client with the rest",
            Fault::Loss { .. } => "packet loss",
            Fault::DiskFull { .. } => "full disk",
        }
    }

    fn random(rng: &mut Rng) -> Fault {
        let node = rng.below(3) as usize;
        match rng.below(6) {
            0 => Fault::Kill {
                node,
                release: rng.below(2) == 0,
                wipe: rng.below(3) == 0,
                down: rng.millis(500, 5_000),
            },
            1 => Fault::Pause {
                node,
                for_: rng.millis(1_000, 15_000),
            },
            2 | 3 => Fault::Partition {
                node,
                one_way: rng.below(3) == 0,
                client: rng.below(2) == 0,
                for_: rng.millis(2_000, 10_000),
            },
            4 => Fault::Loss {
                node,
                percent: 10 + rng.below(30),
                for_: rng.millis(2_000, 10_000),
            },
            _ => Fault::DiskFull {
                node,
                for_: rng.millis(2_000, 10_000),
            },
        }
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Messages the client got a 250 for.
    pub acknowledged: usize,
    /// Acknowledged messages that never reached the sink.
    pub lost: Vec<u64>,
    /// Messages that reached the sink more than once.
    pub duplicates: usize,
    /// Those messages, each with the nodes that delivered it.
    pub duplicated: BTreeMap<u64, Vec<std::net::IpAddr>>,
    /// Times two MACs answered for the VIP at once.
    pub doubles: Vec<Double>,
    /// From the end of the last fault to a healed cluster.
    pub healed_after: Duration,
    /// Who-has rounds the prober asked.
    pub probes: u64,
}

/// The lab's nodes, each running or not.
struct Nodes {
    lab: Lab,
    configs: Vec<PathBuf>,
    running: Vec<Option<Daemon>>,
    /// Each node's data directory, a filesystem of its own.
    disks: Vec<LoopFs>,
}

impl Nodes {
    async fn start(&mut self, i: usize) {
        let d = Daemon::start_in(&self.lab.exec(NODES[i].0), &self.configs[i]).await;
        self.running[i] = Some(d);
    }

    fn signal(&self, i: usize, sig: i32) {
        if let Some(d) = &self.running[i] {
            d.signal(sig);
        }
    }

    /// `nft` in node `i`'s namespace.
    fn nft(&self, i: usize, rule: &str) {
        let ns = self.lab.ns(NODES[i].0);
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", rule])
            .output()
            .expect("nft");
        assert!(
            out.status.success(),
            "nft {rule}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Carry out `f` for its whole duration, then undo it.
    async fn inflict(&mut self, f: &Fault) {
        match *f {
            Fault::Kill {
                node,
                release,
                wipe,
                down,
            } => {
                if let Some(mut d) = self.running[node].take() {
                    let _ = d.child.start_kill();
                    let _ = d.child.wait().await;
                }
                if release {
                    self.release(node);
                }
                if wipe {
                    self.disks[node].wipe();
                }
                tokio::time::sleep(down).await;
                self.start(node).await;
            }
            Fault::Pause { node, for_ } => {
                self.signal(node, libc::SIGSTOP);
                tokio::time::sleep(for_).await;
                self.signal(node, libc::SIGCONT);
            }
            Fault::Partition {
                node,
                one_way,
                client,
                for_,
            } => {
                let mut cut: Vec<String> = (0..3)
                    .filter(|&j| j != node)
                    .map(|j| format!("198.18.0.{}", NODES[j].1))
                    .collect();
                if !client {
                    cut.push(CLIENT.to_string());
                }
                let set = cut.join(", ");
                let mut rules = format!(
                    "add table inet nemesis\n\
                     add chain inet nemesis in {{ type filter hook input priority 0; }}\n\
                     add rule inet nemesis in ip saddr {{ {set} }} drop\n"
                );
                if !one_way {
                    rules += "add chain inet nemesis out { type filter hook output priority 0; }\n";
                    rules += &format!("add rule inet nemesis out ip daddr {{ {set} }} drop\n");
                }
                self.nft_script(node, &rules);
                tokio::time::sleep(for_).await;
                self.nft(node, "delete table inet nemesis");
            }
            Fault::Loss {
                node,
                percent,
                for_,
            } => {
                let rules = format!(
                    "add table inet nemesis\n\
                     add chain inet nemesis in {{ type filter hook input priority 0; }}\n\
                     add chain inet nemesis out {{ type filter hook output priority 0; }}\n\
                     add rule inet nemesis in iifname \"eth0\" numgen random mod 100 < {percent} drop\n\
                     add rule inet nemesis out oifname \"eth0\" numgen random mod 100 < {percent} drop\n"
                );
                self.nft_script(node, &rules);
                tokio::time::sleep(for_).await;
                self.nft(node, "delete table inet nemesis");
            }
            Fault::DiskFull { node, for_ } => {
                let filler = self.disks[node].fill(0);
                tokio::time::sleep(for_).await;
                std::fs::remove_file(filler).unwrap();
            }
        }
    }

    fn nft_script(&self, i: usize, rules: &str) {
        let ns = self.lab.ns(NODES[i].0);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft -f: {rules}");
    }

    /// What systemd's ExecStopPost runs after the daemon died.
    fn release(&self, i: usize) {
        let cfg = self.configs[i].to_string_lossy().into_owned();
        let out = self.lab.mtad(NODES[i].0, &["release", "--config", &cfg]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Until every node sees three members up and voting, and the group
    /// online.
    fn until_healed(&self) {
        let deadline = mtad::clock::instant() + HEAL_WITHIN;
        loop {
            let healed = NODES.iter().all(|(name, _)| {
                let rows = self.lab.nodes(name);
                rows.len() == 3
                    && rows
                        .iter()
                        .all(|r| r["state"] == "up" && r["vote"] == "voter")
            }) && self.group_online();
            if healed {
                return;
            }
            assert!(
                mtad::clock::instant() < deadline,
                "not healed within {HEAL_WITHIN:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn group_online(&self) -> bool {
        let out = self.lab.mtad(NODES[0].0, &["ctl", "--json", "groups"]);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        rows.iter()
            .any(|g| g["name"] == "mta" && g["status"] == "online" && g["phase"] == "assigned")
    }
}

/// The client: sends message after message to the VIP, one connection
/// each, until `stop`; returns the numbers acknowledged with 250.
fn stream_mail(lab: &Lab, seed: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
    lab.within("client", move || {
        let mut acked = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            if send_one(seed, n).is_some() {
                acked.push(n);
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        acked
    })
}

/// One message; Some once the server said 250 to its content.
fn send_one(seed: u64, n: u64) -> Option<()> {
    let limit = Some(Duration::from_secs(5));
    let vip = SocketAddr::from((VIP, 25));
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(limit).ok()?;
    s.set_write_timeout(limit).ok()?;
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    let mut expect = |code: &str| -> Option<()> {
        loop {
            line.clear();
            r.read_line(&mut line).ok()?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.starts_with(code).then_some(());
            }
        }
    };
    expect("220")?;
    for (cmd, code) in [
        ("EHLO client.example\r\n".to_string(), "250"),
        ("MAIL FROM:<a@example.test>\r\n".into(), "250"),
        ("RCPT TO:<b@dest.example>\r\n".into(), "250"),
        ("DATA\r\n".into(), "354"),
        (
            format!("Subject: nemesis {seed} {n}\r\n\r\nmessage {n}\r\n.\r\n"),
            "250",
        ),
    ] {
        s.write_all(cmd.as_bytes()).ok()?;
        expect(code)?;
    }
    let _ = s.write_all(b"QUIT\r\n");
    Some(())
}

/// Which nodes delivered each message number to the sink, once per
/// arrival.
fn arrivals(received: &Received, seed: u64) -> BTreeMap<u64, Vec<std::net::IpAddr>> {
    let prefix = format!("Subject: nemesis {seed} ");
    let mut out: BTreeMap<u64, Vec<_>> = BTreeMap::new();
    for (peer, text) in received.lock().unwrap().iter() {
        let Some(at) = text.find(&prefix) else {
            continue;
        };
        let rest = &text[at + prefix.len()..];
        let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = n.parse() {
            out.entry(n).or_default().push(peer.ip());
        }
    }
    out
}

/// Run the nemesis with `seed` for `faulting` (then heal and check).
pub async fn run(seed: u64, faulting: Duration, dir: &Path) -> Report {
    let (lab, received) = super::lab::with_sink(dir);
    let stop = Arc::new(AtomicBool::new(false));
    let recorder = wire::record(&lab, VIP, stop.clone());
    let rounds = Arc::new(AtomicU64::new(0));
    let prober = wire::probe(&lab, "client", (CLIENT, VIP), rounds.clone(), stop.clone());
    let extra = "preferred_nodes = [\"n1\", \"n2\", \"n3\"]\nannounce_interval = \"2s\"";
    let configs = NODES
        .iter()
        .map(|(name, last)| node_config(dir, name, *last, extra, "info"))
        .collect();
    // node_config puts node NAME's data in DIR/NAME.
    let disks = NODES
        .iter()
        .map(|(name, _)| LoopFs::at(&dir.join(name), 128))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("loop filesystem: {e}"));
    let mut nodes = Nodes {
        lab,
        configs,
        running: (0..3).map(|_| None).collect(),
        disks,
    };
    for i in 0..3 {
        nodes.start(i).await;
    }
    nodes.until_healed();
    let stop_mail = Arc::new(AtomicBool::new(false));
    let sender = stream_mail(&nodes.lab, seed, stop_mail.clone());

    let mut rng = Rng::new(seed);
    let mut report = Report {
        seed,
        ..Report::default()
    };
    let until = mtad::clock::instant() + faulting;
    while mtad::clock::instant() < until {
        let f = Fault::random(&mut rng);
        eprintln!("nemesis {seed}: {f:?}");
        *report.faults.entry(f.kind()).or_default() += 1;
        nodes.inflict(&f).await;
        tokio::time::sleep(rng.millis(500, 2_000)).await;
    }
    let healing = mtad::clock::instant();
    tokio::task::block_in_place(|| nodes.until_healed());
    report.healed_after = healing.elapsed();
    stop_mail.store(true, Ordering::SeqCst);
    let acked = sender.join().unwrap();
    report.acknowledged = acked.len();
    let deadline = mtad::clock::instant() + DELIVER_WITHIN;
    loop {
        let got = arrivals(&received, seed);
        report.lost = acked
            .iter()
            .copied()
            .filter(|n| !got.contains_key(n))
            .collect();
        report.duplicates = got.values().map(|c| c.len() - 1).sum();
        report.duplicated = got.into_iter().filter(|(_, from)| from.len() > 1).collect();
        if report.lost.is_empty() || mtad::clock::instant() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    prober.join().unwrap();
    report.probes = rounds.load(Ordering::SeqCst);
    let claims = recorder.join().unwrap();
    report.doubles = wire::doubles(&claims);
    let macs: BTreeSet<[u8; 6]> = claims.iter().map(|c| c.mac).collect();
    eprintln!(
        "nemesis {seed}: {} MACs answered for the VIP over the run",
        macs.len()
    );
    for d in nodes.running.iter_mut().flatten() {
        let _ = d.child.start_kill();
        let _ = d.child.wait().await;
    }
    report
}
