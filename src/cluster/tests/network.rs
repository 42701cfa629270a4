//! Three real openraft nodes, each with its own durable store, talking over
//! authenticated links on loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::{Config, Raft, ServerState};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::raft::network::*;
use crate::cluster::raft::store::{self, ClusterView};
use crate::cluster::rpc::peer::tests::{cfg, serve_on, LONG};
use crate::cluster::rpc::peer::PeerClient;
use crate::cluster::rpc::{Reply, Request};
use crate::cluster::service::{JoinSettings, NodeService};
use crate::cluster::state::{Command, Member, NodeId, Role, TypeConfig};

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

struct Peer {
    id: NodeId,
    raft: Raft<TypeConfig>,
    view: watch::Receiver<ClusterView>,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

fn name(id: NodeId) -> String {
    format!("n{id}")
}

fn member(id: NodeId, addr: SocketAddr) -> Member {
    Member {
        name: name(id),
        addr: addr.to_string(),
        role: Role::Member,
    }
}

async fn start(id: NodeId, listener: TcpListener, dir: &Path) -> Peer {
    start_named(id, &name(id), listener, dir).await
}

/// A node under any name: a wiped node comes back under its old name with
/// a new id.
async fn start_named(id: NodeId, name: &str, listener: TcpListener, dir: &Path) -> Peer {
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Default::default()
    };
    let config = Arc::new(config.validate().unwrap());
    let (log, sm) = store::open(dir).unwrap();
    let view = sm.subscribe();
    let link = cfg(name, id);
    let network = Network::new(id, link.clone());
    let raft = Raft::new(id, config, network, log, sm).await.unwrap();
    let join = JoinSettings {
        max_voters: 5,
        join_timeout: LONG,
        link: link.clone(),
        view: view.clone(),
    };
    let handler = NodeService::new(link.identity.clone(), raft.clone()).with_join(join);
    let (cancel, server) = serve_on(listener, link, Arc::new(handler));
    Peer {
        id,
        raft,
        view,
        cancel,
        server,
    }
}

impl Peer {
    /// Stops the node as a crash would look to its peers: no more serving,
    /// no more raft, every link closed.
    async fn stop(self) {
        self.cancel.cancel();
        self.server.await.unwrap();
        self.raft.shutdown().await.unwrap();
    }

    async fn applied(&mut self, id: NodeId) {
        let wait = self.view.wait_for(|v| v.state.members.contains_key(&id));
        tokio::time::timeout(LONG, wait)
            .await
            .unwrap_or_else(|_| panic!("node {} never applied member {id}", self.id))
            .unwrap();
    }

    async fn leader_other_than(&self, old: Option<NodeId>) -> NodeId {
        let m = self
            .raft
            .wait(WAIT)
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != old,
                "a leader",
            )
            .await
            .unwrap();
        m.current_leader.unwrap()
    }
}

fn upsert(id: NodeId) -> Command {
    Command::Upsert {
        id,
        member: Member {
            name: format!("m{id}"),
            addr: "127.0.0.1:1".into(),
            role: Role::Member,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_fail_over_over_links() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut nodes = Vec::new();
    for ((&id, l), dir) in ids.iter().zip(listeners).zip(&dirs) {
        nodes.push(start(id, l, dir.path()).await);
    }
    let voters: BTreeMap<NodeId, Member> = ids
        .iter()
        .zip(&addrs)
        .map(|(&id, &a)| (id, member(id, a)))
        .collect();
    nodes[0].raft.initialize(voters).await.unwrap();

    let leader = nodes[0].leader_other_than(None).await;
    let li = ids.iter().position(|&i| i == leader).unwrap();
    nodes[li]
        .raft
        .wait(WAIT)
        .state(ServerState::Leader, "leader")
        .await
        .unwrap();
    nodes[li].raft.client_write(upsert(100)).await.unwrap();
    for n in &mut nodes {
        n.applied(100).await;
    }

    // Status over a link names the leader and its address.
    let follower = (li + 1) % 3;
    let client = PeerClient::new(addrs[follower], cfg("probe", 99), Some(ids[follower]));
    match client.call(Request::Status, LONG).await.unwrap() {
        Reply::Status(s) => {
            assert!(s.initialized);
            assert_eq!(s.name, name(ids[follower]));
            assert_eq!(s.leader, Some((leader, addrs[li])));
        }
        other => panic!("{other:?}"),
    }
    // A link may not speak for another node.
    let forged = openraft::raft::VoteRequest::new(openraft::Vote::new(99, leader), None);
    let reply = client.call(Request::Vote(forged), LONG).await.unwrap();
    assert!(
        matches!(&reply, Reply::Unavailable(why) if why.contains("does not match")),
        "{reply:?}"
    );

    // The leader dies; the other two elect a new one and keep committing.
    nodes.remove(li).stop().await;
    let new_leader = nodes[0].leader_other_than(Some(leader)).await;
    let ni = nodes.iter().position(|n| n.id == new_leader).unwrap();
    nodes[ni]
        .raft
        .wait(WAIT)
        .state(ServerState::Leader, "new leader")
        .await
        .unwrap();
    nodes[ni].raft.client_write(upsert(200)).await.unwrap();
    for n in &mut nodes {
        n.applied(200).await;
    }

    // The old leader comes back at its address with its store: the
    // survivors' clients reach it again and it catches up, no restarts.
    let l = TcpListener::bind(addrs[li]).await.unwrap();
    let mut back = start(leader, l, dirs[li].path()).await;
    back.applied(200).await;
    nodes[ni].raft.client_write(upsert(300)).await.unwrap();
    back.applied(300).await;

    back.stop().await;
    for n in nodes {
        n.stop().await;
    }
}

#[cfg(test)]
#[path = "join.rs"]
mod join;
