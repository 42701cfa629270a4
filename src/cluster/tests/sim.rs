//! A randomized simulation of whole clusters under joins, graceful leaves,
//! crashes, wiped disks, partitions, one-way link failures, link resets and
//! delays.
//!
//! Each schedule is drawn from a seed: how many nodes, the voter limit,
//! every fault and when it happens, and the network's delays. Nodes are the
//! real cluster code (links, handshake, raft on the durable store, join
//! loop, failure detection) over the in-memory network, on a single-threaded
//! runtime with paused time, so a schedule's 30-odd virtual seconds take a
//! fraction of a real one. Interleavings are not fully reproducible
//! (openraft's election jitter and tokio's `select!` draw their own
//! randomness), but a failing seed replays the same schedule: run it alone
//! with `MTAD_SIM_SEED=<seed> cargo test --lib sim`.
//!
//! Checked throughout: at most one leader per term, across all nodes and
//! restarts. Checked at a midpoint and at the end, after the network heals
//! and every crashed node is started again (with its data dir, or a wiped
//! one): every node converges to the same leader, the same membership —
//! exactly the current incarnations, the voter set filled up to the limit —
//! and the same published state with every member up. No node is ever
//! restarted to make that happen.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ServerState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::link::memnet::MemNet;
use crate::cluster::node::ClusterNode;
use crate::cluster::state::{NodeId, NodeState};
use crate::config::{ClusterConfig, ClusterRole};

/// Virtual time a healed cluster has to converge.
const CONVERGE: Duration = Duration::from_secs(60);
/// Real time one schedule may take before it counts as hung (they take
/// well under a second).
const HUNG: Duration = Duration::from_secs(120);
/// Random steps before the midpoint and again before the end.
const STEPS: usize = 12;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

struct Running {
    node: ClusterNode,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

struct Slot {
    name: String,
    addr: SocketAddr,
    run: Option<Running>,
}

/// Terms and who led them, as seen by any node; and what broke the rule.
#[derive(Default)]
struct Elections {
    leaders: BTreeMap<u64, NodeId>,
    violations: Vec<String>,
}

impl Elections {
    fn claim(&mut self, term: u64, leader: NodeId, seen_by: NodeId) {
        let first = *self.leaders.entry(term).or_insert(leader);
        if first != leader {
            self.violations.push(format!(
                "term {term} has two leaders: {first:x} and {leader:x} (seen by {seen_by:x})"
            ));
        }
    }
}

struct Sim {
    rng: Rng,
    net: MemNet,
    dir: tempfile::TempDir,
    secret: PathBuf,
    seeds: Vec<SocketAddr>,
    max_voters: usize,
    slots: Vec<Slot>,
    elections: Arc<Mutex<Elections>>,
    trace: Vec<String>,
    wiped: bool,
}

/// Data dirs on tmpfs when there is one: fsync costs nothing there, and
/// the simulation is about the protocol, not the disk.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let n = 3 + rng.below(3);
        let max_voters = 3 + rng.below(3);
        let dir = scratch();
        let secret = dir.path().join("cluster.key");
        std::fs::write(&secret, "the simulation's cluster secret\n").unwrap();
        let slots: Vec<Slot> = (0..n)
            .map(|i| Slot {
                name: format!("n{i}"),
                addr: SocketAddr::from(([127, 0, 0, 10 + i as u8], 7400)),
                run: None,
            })
            .collect();
        // The first three are the seeds every node lists; the rest join.
        let seeds = slots[..3].iter().map(|s| s.addr).collect();
        Sim {
            net: MemNet::new(rng.next()),
            rng,
            dir,
            secret,
            seeds,
            max_voters,
            slots,
            elections: Arc::default(),
            trace: vec![format!("{n} nodes, at most {max_voters} voters")],
            wiped: false,
        }
    }

    fn note(&mut self, what: String) {
        let at = tokio::time::Instant::now();
        self.trace.push(format!("{at:?}: {what}"));
    }

    fn config(&self, i: usize) -> ClusterConfig {
        ClusterConfig {
            name: "sim".into(),
            listen: self.slots[i].addr,
            seeds: self.seeds.clone(),
            secret_file: self.secret.clone(),
            accept_secret_files: vec![],
            role: ClusterRole::Member,
            max_voters: self.max_voters,
            heartbeat_interval: Duration::from_millis(50),
            election_timeout: Duration::from_millis(300),
            join_backoff_min: Duration::from_millis(20),
            join_backoff_max: Duration::from_millis(500),
            join_timeout: Duration::from_secs(5),
        }
    }

    async fn start(&mut self, i: usize) {
        let cfg = self.config(i);
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let slot = &self.slots[i];
        let data = self.dir.path().join(&slot.name);
        let transport = self.net.transport(slot.addr.ip());
        let node =
            ClusterNode::start_on(transport, &cfg, &slot.name, &data, cancel.clone(), &tracker)
                .await
                .unwrap_or_else(|e| panic!("{} cannot start: {e}", slot.name));
        let id = node.identity.incarnation;
        self.watch(&node);
        self.slots[i].run = Some(Running {
            node,
            cancel,
            tracker,
        });
        self.note(format!("start {} as {id:x}", self.slots[i].name));
    }

    /// Record every leader any node reports, for the whole run.
    fn watch(&self, node: &ClusterNode) {
        let mut metrics = node.raft.metrics();
        let elections = self.elections.clone();
        tokio::spawn(async move {
            loop {
                {
                    let m = metrics.borrow_and_update();
                    let mut e = elections.lock().unwrap();
                    if m.state == ServerState::Leader {
                        e.claim(m.current_term, m.id, m.id);
                    }
                    if m.vote.is_committed() {
                        if let Some(l) = m.vote.leader_id().voted_for() {
                            e.claim(m.vote.leader_id().term, l, m.id);
                        }
                    }
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Kill a node: its links reset, its listener vanishes, its tasks end.
    async fn crash(&mut self, i: usize) {
        let Some(r) = self.slots[i].run.take() else {
            return;
        };
        self.net.crash(self.slots[i].addr.ip());
        r.cancel.cancel();
        let _ = r.node.raft.shutdown().await;
        r.tracker.close();
        r.tracker.wait().await;
        self.note(format!("crash {}", self.slots[i].name));
    }

    fn running(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].run.is_some())
            .collect()
    }

    fn stopped(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].run.is_none())
            .collect()
    }

    fn pick(&mut self, from: &[usize]) -> Option<usize> {
        (!from.is_empty()).then(|| from[self.rng.below(from.len())])
    }

    /// One random step. Wiping a disk is allowed once, after the midpoint,
    /// when every voter is known to be current: losing more than that
    /// would lose a majority's log, which no consensus system survives.
    async fn step(&mut self, may_wipe: bool) {
        let wait = self.rng.millis(20, 1500);
        tokio::time::sleep(wait).await;
        let ips: Vec<_> = self.slots.iter().map(|s| s.addr.ip()).collect();
        match self.rng.below(20) {
            0..=4 => {
                let stopped = self.stopped();
                if let Some(i) = self.pick(&stopped) {
                    self.start(i).await;
                }
            }
            5..=6 => {
                let running = self.running();
                if let Some(i) = self.pick(&running) {
                    self.crash(i).await;
                }
            }
            7 => {
                let running = self.running();
                if let Some(i) = self.pick(&running) {
                    // SIGTERM: leave (handing leadership over), then stop.
                    let node = &self.slots[i].run.as_ref().unwrap().node;
                    node.leave(Duration::from_secs(5)).await;
                    self.note(format!("{} leaves", self.slots[i].name));
                    self.crash(i).await;
                }
            }
            8..=10 => {
                let mut side = Vec::new();
                let mut rest = Vec::new();
                for ip in ips {
                    if self.rng.below(2) == 0 {
                        side.push(ip);
                    } else {
                        rest.push(ip);
                    }
                }
                self.net.split(&side, &rest);
                self.note(format!("partition {side:?} | {rest:?}"));
            }
            11 => {
                let (a, b) = (self.rng.below(ips.len()), self.rng.below(ips.len()));
                if a != b {
                    self.net.block(ips[a], ips[b]);
                    self.note(format!("block {} -> {}", ips[a], ips[b]));
                }
            }
            12..=13 => {
                let ip = ips[self.rng.below(ips.len())];
                self.net.cut(ip);
                self.note(format!("reset links of {ip}"));
            }
            14..=16 => {
                self.net.heal();
                self.note("heal".into());
            }
            17 => {
                let max = [0, 2, 10, 40][self.rng.below(4)];
                self.net
                    .set_delay(Duration::ZERO, Duration::from_millis(max));
                self.note(format!("delays up to {max} ms"));
            }
            _ if may_wipe && !self.wiped => {
                let i = self.rng.below(self.slots.len());
                self.crash(i).await;
                std::fs::remove_dir_all(self.dir.path().join(&self.slots[i].name)).unwrap();
                self.wiped = true;
                self.note(format!("wipe {}", self.slots[i].name));
            }
            _ => {}
        }
    }

    /// Heal everything, start every stopped node, and wait for agreement.
    async fn converge(&mut self, label: &str) {
        self.net.heal();
        // A healthy LAN: raft calls time out at 3/4 of the heartbeat
        // interval, so round trips beyond that are a brownout, not a LAN.
        self.net.set_delay(Duration::ZERO, Duration::from_millis(5));
        self.note(format!("{label}: heal, delays up to 5 ms, start everyone"));
        for i in self.stopped() {
            self.start(i).await;
        }
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            let problem = self.disagreement();
            self.check_elections();
            let Some(problem) = problem else {
                self.note(format!("{label}: converged"));
                return;
            };
            if tokio::time::Instant::now() >= deadline {
                self.fail(&format!("{label}: no convergence: {problem}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What keeps the nodes from agreeing, if anything.
    fn disagreement(&self) -> Option<String> {
        let nodes: Vec<&ClusterNode> = self
            .slots
            .iter()
            .filter_map(|s| s.run.as_ref().map(|r| &r.node))
            .collect();
        let ids: BTreeSet<NodeId> = nodes.iter().map(|n| n.identity.incarnation).collect();
        let voters_wanted = ids.len().min(self.max_voters);
        let first = nodes[0].raft.metrics().borrow().clone();
        let leader = first.current_leader?;
        let lead = nodes.iter().find(|n| n.identity.incarnation == leader)?;
        if lead.raft.metrics().borrow().state != ServerState::Leader {
            return Some(format!("{leader:x} is followed but does not lead"));
        }
        let want_state = lead.view.borrow().state.clone();
        for n in &nodes {
            let m = n.raft.metrics().borrow().clone();
            let name = &n.identity.name;
            if m.current_leader != Some(leader) {
                return Some(format!(
                    "{name} follows {:?}, not {leader:x}",
                    m.current_leader
                ));
            }
            let ms = m.membership_config.membership();
            if ms.get_joint_config().len() != 1 {
                return Some(format!("{name}: membership change in progress"));
            }
            let members: BTreeSet<NodeId> = ms.nodes().map(|(id, _)| *id).collect();
            if members != ids {
                return Some(format!("{name}: members {members:x?}, want {ids:x?}"));
            }
            let voters = ms.voter_ids().count();
            if voters != voters_wanted {
                return Some(format!("{name}: {voters} voters, want {voters_wanted}"));
            }
            let state = n.view.borrow().state.clone();
            if state != want_state {
                return Some(format!("{name}: published state differs from the leader's"));
            }
            let states: BTreeMap<NodeId, NodeState> =
                state.members.iter().map(|(id, m)| (*id, m.state)).collect();
            let keys: BTreeSet<NodeId> = states.keys().copied().collect();
            if keys != ids || states.values().any(|s| *s != NodeState::Up) {
                return Some(format!("{name}: published members {states:x?}"));
            }
        }
        None
    }

    fn check_elections(&self) {
        let e = self.elections.lock().unwrap();
        if let Some(v) = e.violations.first() {
            let v = v.clone();
            drop(e);
            self.fail(&v);
        }
    }

    fn fail(&self, why: &str) -> ! {
        let nodes: Vec<String> = self
            .slots
            .iter()
            .filter_map(|s| s.run.as_ref())
            .map(|r| {
                let m = r.node.raft.metrics().borrow().clone();
                format!(
                    "{} {:x}: {:?} term {} leader {:x?} applied {:?} replication {:?}",
                    r.node.identity.name,
                    m.id,
                    m.state,
                    m.current_term,
                    m.current_leader,
                    m.last_applied.map(|l| l.index),
                    m.replication
                )
            })
            .collect();
        panic!(
            "{why}\nschedule:\n  {}\nnodes:\n  {}",
            self.trace.join("\n  "),
            nodes.join("\n  ")
        );
    }

    async fn stop_all(&mut self) {
        for i in self.running() {
            self.crash(i).await;
        }
    }
}

/// One schedule, from its seed.
async fn schedule(seed: u64) {
    let mut sim = Sim::new(seed);
    // The seeds come up first, in a random order, a little apart.
    let mut order: Vec<usize> = (0..3).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, sim.rng.below(i + 1));
    }
    for i in order {
        sim.start(i).await;
        let gap = sim.rng.millis(0, 400);
        tokio::time::sleep(gap).await;
    }
    for _ in 0..STEPS {
        sim.step(false).await;
    }
    sim.converge("midpoint").await;
    for _ in 0..STEPS {
        sim.step(true).await;
    }
    sim.converge("end").await;
    sim.check_elections();
    sim.stop_all().await;
}

fn run(seed: u64) {
    // MTAD_SIM_LOG=<filter> shows the nodes' logs (for one replayed seed).
    if let Ok(filter) = std::env::var("MTAD_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(schedule(seed));
}

/// Schedules per test function; four functions run side by side.
fn count() -> u64 {
    std::env::var("MTAD_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

fn batch(part: u64) {
    if let Some(seed) = std::env::var("MTAD_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        if part == 0 {
            run(seed);
        }
        return;
    }
    let n = count();
    for seed in part * n..(part + 1) * n {
        // Its own thread, so a schedule that spins without letting virtual
        // time pass fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(|| run(seed));
            let _ = tx.send(outcome.err().map(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            }));
        });
        let replay = format!("MTAD_SIM_SEED={seed} replays it");
        match rx.recv_timeout(HUNG) {
            Ok(None) => {}
            Ok(Some(msg)) => panic!("seed {seed} failed ({replay}): {msg}"),
            Err(_) => panic!("seed {seed} hung for {HUNG:?} of real time ({replay})"),
        }
    }
}

#[test]
fn random_schedules_0() {
    batch(0);
}

#[test]
fn random_schedules_1() {
    batch(1);
}

#[test]
fn random_schedules_2() {
    batch(2);
}

#[test]
fn random_schedules_3() {
    batch(3);
}
