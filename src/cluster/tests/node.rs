//! Nodes started from configuration form a cluster through their seeds.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::node::*;
use crate::cluster::state::NodeId;
use crate::config::{ClusterConfig, ClusterRole};

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
        accept_secret_files: vec![],
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
    max_voters: usize,
    /// Links over this in-memory network instead of TCP.
    net: Option<crate::cluster::link::memnet::MemNet>,
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
            max_voters: 5,
            net: None,
            dir,
            secret,
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Stop every node and wait for all their tasks.
    async fn stop<const N: usize>(self, nodes: [ClusterNode; N]) {
        self.cancel.cancel();
        for n in nodes {
            n.raft.shutdown().await.unwrap();
        }
        self.tracker.close();
        self.tracker.wait().await;
    }

    async fn node(&self, name: &str, listen: SocketAddr, seeds: &[SocketAddr]) -> ClusterNode {
        self.node_as(
            name,
            listen,
            seeds,
            ClusterRole::Member,
            self.cancel.clone(),
        )
        .await
    }

    /// A node with its own role and its own stop switch.
    async fn node_as(
        &self,
        name: &str,
        listen: SocketAddr,
        seeds: &[SocketAddr],
        role: ClusterRole,
        cancel: CancellationToken,
    ) -> ClusterNode {
        let mut cfg = config(listen, seeds, &self.secret);
        cfg.role = role;
        cfg.max_voters = self.max_voters;
        let data = self.dir.path().join(name);
        let transport = match &self.net {
            Some(net) => net.transport(listen.ip()),
            None => crate::cluster::link::transport::Tcp::shared(),
        };
        ClusterNode::start_on(transport, &cfg, name, &data, cancel, &self.tracker)
            .await
            .unwrap()
    }
}

async fn voters(node: &ClusterNode, n: usize) -> BTreeSet<NodeId> {
    let m = node
        .raft
        .wait(WAIT)
        .metrics(
            // Settled: not in the joint phase of a membership change.
            |m| {
                let ms = m.membership_config.membership();
                ms.get_joint_config().len() == 1 && ms.voter_ids().count() == n
            },
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
    h.stop([a, b, c, d]).await;
}

async fn member_state(node: &ClusterNode, id: NodeId, want: crate::cluster::NodeState) {
    let mut view = node.view.clone();
    let wait = view.wait_for(|v| v.state.members.get(&id).is_some_and(|m| m.state == want));
    tokio::time::timeout(WAIT.unwrap(), wait)
        .await
        .unwrap_or_else(|_| {
            let m = node.raft.metrics().borrow().clone();
            panic!(
                "member {id} never became {want:?}: state {:?}, metrics {m:?}",
                node.view.borrow().state
            )
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_and_a_witness_survive_a_dead_member_and_see_it_come_back() {
    use crate::cluster::NodeState;
    let h = Harness::new();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let a = h
        .node_as(
            "a",
            addrs[0],
            &addrs,
            ClusterRole::Member,
            h.cancel.child_token(),
        )
        .await;
    let b_stop = h.cancel.child_token();
    let b = h
        .node_as("b", addrs[1], &addrs, ClusterRole::Member, b_stop.clone())
        .await;
    let w = h
        .node_as(
            "w",
            addrs[2],
            &addrs,
            ClusterRole::Witness,
            h.cancel.child_token(),
        )
        .await;
    voters(&a, 3).await;
    let b_id = b.identity.incarnation;
    member_state(&a, b_id, NodeState::Up).await;
    let witness = w
        .view
        .borrow()
        .state
        .members
        .get(&w.identity.incarnation)
        .map(|m| m.member.role);
    let witness = match witness {
        Some(r) => r,
        None => {
            member_state(&w, w.identity.incarnation, NodeState::Up).await;
            w.view.borrow().state.members[&w.identity.incarnation]
                .member
                .role
        }
    };
    assert_eq!(witness, crate::cluster::Role::Witness);

    // b dies: a and the witness keep a quorum, elect a leader if needed,
    // commit, and publish b as down.
    b_stop.cancel();
    b.raft.shutdown().await.unwrap();
    let leader = a
        .raft
        .wait(WAIT)
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != b_id),
            "a leader other than b",
        )
        .await
        .unwrap()
        .current_leader
        .unwrap();
    let leader = if leader == a.identity.incarnation {
        &a
    } else {
        &w
    };
    leader
        .raft
        .wait(WAIT)
        .state(openraft::ServerState::Leader, "leading")
        .await
        .unwrap();
    member_state(&a, b_id, NodeState::Down).await;

    // b comes back with its data dir: same incarnation, rejoins from its
    // persisted state, and is up again — nobody restarted.
    let b = h
        .node_as(
            "b",
            addrs[1],
            &addrs,
            ClusterRole::Member,
            h.cancel.child_token(),
        )
        .await;
    assert_eq!(b.identity.incarnation, b_id);
    member_state(&a, b_id, NodeState::Up).await;

    h.stop([a, b, w]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_voter_is_promoted_when_a_voter_slot_frees() {
    let mut h = Harness::new();
    h.max_voters = 3;
    let addrs: Vec<SocketAddr> = (0..4).map(|_| free_addr()).collect();
    let seeds = &addrs[..3];
    let a = h.node("a", addrs[0], seeds).await;
    let b = h.node("b", addrs[1], seeds).await;
    let c = h.node("c", addrs[2], seeds).await;
    voters(&a, 3).await;
    // The voter set is full: d joins without a vote.
    let d = h.node("d", addrs[3], seeds).await;
    let d_id = d.identity.incarnation;
    a.raft
        .wait(WAIT)
        .metrics(
            |m| m.membership_config.membership().get_node(&d_id).is_some(),
            "d admitted",
        )
        .await
        .unwrap();
    assert!(!voters(&a, 3).await.contains(&d_id));
    // c is removed (as an operator's evict would): d takes its place.
    let leader_id = a.raft.metrics().borrow().current_leader.unwrap();
    let leader = [&a, &b, &c]
        .into_iter()
        .find(|n| n.identity.incarnation == leader_id)
        .unwrap();
    let victim = [&a, &b, &c]
        .into_iter()
        .find(|n| n.identity.incarnation != leader_id)
        .unwrap()
        .identity
        .incarnation;
    let gone = std::collections::BTreeSet::from([victim]);
    // One membership change at a time: let d's admission be committed.
    leader
        .raft
        .wait(WAIT)
        .metrics(
            |m| m.last_applied.map(|l| l.index) >= m.membership_config.log_id().map(|l| l.index),
            "membership committed",
        )
        .await
        .unwrap();
    leader
        .raft
        .change_membership(openraft::ChangeMembers::RemoveVoters(gone), false)
        .await
        .unwrap();
    let now = voters(leader, 3).await;
    assert!(now.contains(&d_id) && !now.contains(&victim), "{now:?}");
    h.stop([a, b, c, d]).await;
}

#[path = "join_cut.rs"]
mod join_cut;

#[path = "heal.rs"]
mod heal;

#[path = "leave.rs"]
mod leave;
