//! Cluster timings: a five-node cluster forming from cold start, a node
//! joining, a killed node detected as down, its return seen as up, and a
//! leader leaving gracefully (until a successor leads).
//! Run with `cargo bench --bench cluster`; results go to BENCHMARKS.md.
//! Everything runs in one process on 127.0.0.1, with the default raft
//! timings (heartbeat 100 ms, election timeout 500 ms).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mtad::cluster::node::ClusterNode;
use mtad::cluster::{NodeId, NodeState};
use mtad::config::{ClusterConfig, ClusterRole};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const RUNS: usize = 5;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn config(listen: SocketAddr, seeds: &[SocketAddr], secret: &Path) -> ClusterConfig {
    ClusterConfig {
        name: "bench".into(),
        listen,
        seeds: seeds.to_vec(),
        secret_file: secret.to_path_buf(),
        accept_secret_files: vec![],
        role: ClusterRole::Member,
        max_voters: 5,
        heartbeat_interval: Duration::from_millis(100),
        election_timeout: Duration::from_millis(500),
        join_backoff_min: Duration::from_millis(100),
        join_backoff_max: Duration::from_secs(2),
        join_timeout: Duration::from_secs(30),
    }
}

async fn settled_voters(node: &ClusterNode, n: usize) {
    node.raft
        .wait(Some(Duration::from_secs(60)))
        .metrics(
            |m| {
                let ms = m.membership_config.membership();
                ms.get_joint_config().len() == 1 && ms.voter_ids().count() == n
            },
            "voters",
        )
        .await
        .unwrap();
}

async fn state_of(node: &ClusterNode, id: NodeId, want: NodeState) {
    let mut view = node.view.clone();
    view.wait_for(|v| v.state.members.get(&id).is_some_and(|m| m.state == want))
        .await
        .unwrap();
}

struct Run {
    form: Duration,
    join: Duration,
    detect: Duration,
    back: Duration,
    leave: Duration,
}

async fn one_run() -> Run {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("key");
    std::fs::write(&secret, "benchmark secret of enough length").unwrap();
    let tracker = TaskTracker::new();
    let root = CancellationToken::new();
    let addrs: Vec<SocketAddr> = (0..6).map(|_| free_addr()).collect();
    let names = ["a", "b", "c", "d", "e", "f"];
    let start = |i: usize, cancel: CancellationToken| {
        let cfg = config(addrs[i], &addrs[..5], &secret);
        let data = dir.path().join(names[i]);
        let tracker = tracker.clone();
        async move {
            ClusterNode::start(&cfg, names[i], &data, cancel, &tracker)
                .await
                .unwrap()
        }
    };

    let t0 = mtad::clock::instant();
    let mut nodes = Vec::new();
    let mut stops = Vec::new();
    for i in 0..5 {
        let stop = root.child_token();
        nodes.push(start(i, stop.clone()).await);
        stops.push(stop);
    }
    for n in &nodes {
        settled_voters(n, 5).await;
    }
    let form = t0.elapsed();

    // A sixth node joins (as a non-voter: five voters is the maximum).
    let t1 = mtad::clock::instant();
    let f = start(5, root.child_token()).await;
    f.raft
        .wait(Some(Duration::from_secs(60)))
        .metrics(
            |m| {
                m.membership_config
                    .membership()
                    .get_node(&f.identity.incarnation)
                    .is_some()
            },
            "f admitted",
        )
        .await
        .unwrap();
    let join = t1.elapsed();

    // Kill a follower: from the kill to the leader publishing it down.
    let leader = nodes[0].raft.metrics().borrow().current_leader.unwrap();
    let victim = nodes
        .iter()
        .position(|n| n.identity.incarnation != leader)
        .unwrap();
    let victim_id = nodes[victim].identity.incarnation;
    let observer = nodes
        .iter()
        .position(|n| n.identity.incarnation == leader)
        .unwrap();
    state_of(&nodes[observer], victim_id, NodeState::Up).await;
    let t2 = mtad::clock::instant();
    stops[victim].cancel();
    nodes[victim].raft.shutdown().await.unwrap();
    state_of(&nodes[observer], victim_id, NodeState::Down).await;
    let detect = t2.elapsed();

    // It returns with its data dir: until it is published up again.
    let t3 = mtad::clock::instant();
    let back_node = start(victim, root.child_token()).await;
    state_of(&nodes[observer], victim_id, NodeState::Up).await;
    let back = t3.elapsed();

    // The leader leaves as on SIGTERM: recorded as left, a successor leads.
    let t4 = mtad::clock::instant();
    nodes[observer].leave(Duration::from_secs(10)).await;
    let leave = t4.elapsed();
    let successor = nodes[observer].raft.metrics().borrow().current_leader;
    assert!(
        successor.is_some_and(|l| l != leader),
        "handed over: {successor:?}"
    );

    root.cancel();
    for n in nodes.iter().chain([&f, &back_node]) {
        let _ = n.raft.shutdown().await;
    }
    tracker.close();
    tracker.wait().await;
    Run {
        form,
        join,
        detect,
        back,
        leave,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo test --all-targets` runs bench targets too; only measure
    // when asked to by `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let runs: Vec<Run> = (0..RUNS).map(|_| rt.block_on(one_run())).collect();
    let show = |name: &str, f: fn(&Run) -> Duration| {
        let v: Vec<Duration> = runs.iter().map(f).collect();
        let max = *v.iter().max().unwrap();
        println!(
            "| {name} | {:.0} ms | {:.0} ms |",
            median(v).as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    };
    println!("| measure ({RUNS} runs) | median | max |\n|---|---|---|");
    show("5 nodes form from cold start", |r| r.form);
    show("a 6th node joins (non-voter)", |r| r.join);
    show("killed follower published down", |r| r.detect);
    show("returned node published up", |r| r.back);
    show("leader leaves: recorded, successor leads", |r| r.leave);
}
