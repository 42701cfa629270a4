//! A node stopping on purpose leaves gracefully: it is published as left
//! (never down), a leader hands over first, and a returning member is up
//! again without anyone else restarting.

use super::*;
use crate::cluster::link::memnet::MemNet;
use crate::cluster::NodeState;

fn mem_addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 7400))
}

/// Three formed nodes, each with its own stop switch.
async fn three(h: &mut Harness) -> (MemNet, Vec<(ClusterNode, CancellationToken)>) {
    let net = MemNet::new(5);
    h.net = Some(net.clone());
    let seeds: Vec<SocketAddr> = (1..=3).map(mem_addr).collect();
    let mut nodes = Vec::new();
    for (name, addr) in ["a", "b", "c"].into_iter().zip(&seeds) {
        let stop = h.cancel.child_token();
        let n = h
            .node_as(name, *addr, &seeds, ClusterRole::Member, stop.clone())
            .await;
        nodes.push((n, stop));
    }
    voters(&nodes[0].0, 3).await;
    for (n, _) in &nodes {
        member_state(&nodes[0].0, n.identity.incarnation, NodeState::Up).await;
    }
    (net, nodes)
}

/// What SIGTERM does to the cluster side: leave, then stop.
async fn leave_and_stop(net: &MemNet, node: ClusterNode, stop: CancellationToken) {
    node.leave(Duration::from_secs(5)).await;
    stop.cancel();
    node.raft.shutdown().await.unwrap();
    net.crash(node.addr.ip());
}

fn leader_of(node: &ClusterNode) -> Option<NodeId> {
    node.raft.metrics().borrow().current_leader
}

#[tokio::test(start_paused = true)]
async fn a_follower_that_leaves_is_left_not_down_and_up_when_back() {
    let mut h = Harness::new();
    let (net, mut nodes) = three(&mut h).await;
    let leader = leader_other_than_none(&nodes[0].0).await;
    let i = nodes
        .iter()
        .position(|(n, _)| n.identity.incarnation != leader)
        .unwrap();
    let (gone, stop) = nodes.remove(i);
    let (gone_id, gone_name, gone_addr) = (
        gone.identity.incarnation,
        gone.identity.name.clone(),
        gone.addr,
    );
    leave_and_stop(&net, gone, stop).await;
    member_state(&nodes[0].0, gone_id, NodeState::Left).await;
    // Long past the down threshold, it is still left, not down.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let state = nodes[0].0.view.borrow().state.members[&gone_id].state;
    assert_eq!(state, NodeState::Left);

    // It comes back with its data dir: the same member, up again.
    let seeds: Vec<SocketAddr> = (1..=3).map(mem_addr).collect();
    let back = h.node(&gone_name, gone_addr, &seeds).await;
    assert_eq!(back.identity.incarnation, gone_id);
    member_state(&nodes[0].0, gone_id, NodeState::Up).await;
    let [(a, _), (b, _)]: [(ClusterNode, CancellationToken); 2] = nodes.try_into().ok().unwrap();
    h.stop([a, b, back]).await;
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_leaves_hands_over_before_it_stops() {
    let mut h = Harness::new();
    let (net, mut nodes) = three(&mut h).await;
    let leader = leader_other_than_none(&nodes[0].0).await;
    let i = nodes
        .iter()
        .position(|(n, _)| n.identity.incarnation == leader)
        .unwrap();
    let (old, stop) = nodes.remove(i);
    old.leave(Duration::from_secs(5)).await;
    // Before it stops, someone else leads, and it follows them.
    let successor = leader_of(&old).expect("a successor");
    assert_ne!(successor, leader);
    assert!(nodes
        .iter()
        .any(|(n, _)| n.identity.incarnation == successor));
    stop.cancel();
    old.raft.shutdown().await.unwrap();
    net.crash(old.addr.ip());
    // The two left keep working and publish the old leader as left.
    member_state(&nodes[0].0, leader, NodeState::Left).await;
    member_state(&nodes[1].0, leader, NodeState::Left).await;
    for (n, _) in &nodes {
        assert_eq!(leader_of(n), Some(successor));
    }
    let [(a, _), (b, _)]: [(ClusterNode, CancellationToken); 2] = nodes.try_into().ok().unwrap();
    h.stop([a, b]).await;
}

async fn leader_other_than_none(node: &ClusterNode) -> NodeId {
    node.raft
        .wait(WAIT)
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .unwrap()
        .current_leader
        .unwrap()
}
