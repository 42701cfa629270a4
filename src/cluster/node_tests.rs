//! Nodes started from configuration form a cluster through their seeds.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::*;
use crate::cluster::types::NodeId;

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn config(listen: SocketAddr, seeds: &[SocketAddr], secret: &Path) -> ClusterConfig {
    ClusterConfig {
        name: "test".into(),
        listen,
        seeds: seeds.to_vec(),
        secret_file: secret.to_path_buf(),
        role: ClusterRole::Member,
        max_voters: 5,
        heartbeat_interval: Duration::from_millis(50),
        election_timeout: Duration::from_millis(300),
        join_backoff_min: Duration::from_millis(20),
        join_backoff_max: Duration::from_millis(300),
        join_timeout: Duration::from_secs(10),
    }
}

struct Harness {
    dir: tempfile::TempDir,
    secret: PathBuf,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("cluster.key");
        std::fs::write(&secret, "a test secret of enough length\n").unwrap();
        Harness {
            dir,
            secret,
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    async fn node(&self, name: &str, listen: SocketAddr, seeds: &[SocketAddr]) -> ClusterNode {
        let cfg = config(listen, seeds, &self.secret);
        let data = self.dir.path().join(name);
        ClusterNode::start(&cfg, name, &data, self.cancel.clone(), &self.tracker)
            .await
            .unwrap()
    }
}

async fn voters(node: &ClusterNode, n: usize) -> BTreeSet<NodeId> {
    let m = node
        .raft
        .wait(WAIT)
        .metrics(
            |m| m.membership_config.membership().voter_ids().count() == n,
            "voters",
        )
        .await
        .unwrap();
    m.membership_config.membership().voter_ids().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_from_seeds_and_a_fourth_joins() {
    let h = Harness::new();
    let addrs: Vec<SocketAddr> = (0..4).map(|_| free_addr()).collect();
    let seeds = &addrs[..3];
    // All three start fresh at once, each listing all three as seeds.
    let a = h.node("a", addrs[0], seeds).await;
    let b = h.node("b", addrs[1], seeds).await;
    let c = h.node("c", addrs[2], seeds).await;
    let want: BTreeSet<NodeId> = [&a, &b, &c]
        .iter()
        .map(|n| n.identity.incarnation)
        .collect();
    for n in [&a, &b, &c] {
        assert_eq!(voters(n, 3).await, want);
    }
    // A fourth node knows only b as its seed.
    let d = h.node("d", addrs[3], &addrs[1..2]).await;
    let all = voters(&a, 4).await;
    assert!(all.contains(&d.identity.incarnation));
    assert_eq!(voters(&d, 4).await, all);
    h.cancel.cancel();
    for n in [a, b, c, d] {
        n.raft.shutdown().await.unwrap();
    }
    h.tracker.close();
    h.tracker.wait().await;
}
