//! Partitions, dropped links, a join stuck in catch-up and a wiped disk
//! heal by themselves: nodes run over the in-memory network, with paused
//! time, and nobody is restarted.

use std::net::IpAddr;

use super::*;
use crate::cluster::link::memnet::MemNet;
use crate::cluster::NodeState;

fn mem_addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 7400))
}

/// Three nodes a, b, c over a fresh in-memory network, formed.
async fn three(h: &mut Harness) -> (MemNet, [ClusterNode; 3]) {
    let net = MemNet::new(42);
    h.net = Some(net.clone());
    let seeds: Vec<SocketAddr> = (1..=3).map(mem_addr).collect();
    let a = h.node("a", seeds[0], &seeds).await;
    let b = h.node("b", seeds[1], &seeds).await;
    let c = h.node("c", seeds[2], &seeds).await;
    for n in [&a, &b, &c] {
        voters(n, 3).await;
    }
    (net, [a, b, c])
}

fn ip(n: &ClusterNode) -> IpAddr {
    n.addr.ip()
}

fn id(n: &ClusterNode) -> NodeId {
    n.identity.incarnation
}

/// Waits until `node` follows a leader other than `not`, and returns it.
async fn leader_other_than(node: &ClusterNode, not: Option<NodeId>) -> NodeId {
    node.raft
        .wait(WAIT)
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != not,
            "another leader",
        )
        .await
        .unwrap()
        .current_leader
        .unwrap()
}

/// Waits until `node` has applied at least up to `index`.
async fn applied(node: &ClusterNode, index: u64) {
    node.raft
        .wait(WAIT)
        .metrics(
            |m| m.last_applied.is_some_and(|l| l.index >= index),
            "caught up",
        )
        .await
        .unwrap();
}

fn last_applied(node: &ClusterNode) -> u64 {
    node.raft
        .metrics()
        .borrow()
        .last_applied
        .map_or(0, |l| l.index)
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_leader_rejoins_as_follower_when_it_heals() {
    let mut h = Harness::new();
    let (net, nodes) = three(&mut h).await;
    let old = leader_other_than(&nodes[0], None).await;
    let (cut_off, rest): (Vec<_>, Vec<_>) = nodes.iter().partition(|n| id(n) == old);
    let (cut_off, rest) = (cut_off[0], rest);
    net.split(
        &[ip(cut_off)],
        &rest.iter().map(|n| ip(n)).collect::<Vec<_>>(),
    );

    // The majority elects a new leader and publishes the old one down.
    let new = leader_other_than(rest[0], Some(old)).await;
    assert_eq!(leader_other_than(rest[1], Some(old)).await, new);
    member_state(rest[0], old, NodeState::Down).await;
    let term = rest[0].raft.metrics().borrow().current_term;

    net.heal();
    // The old leader learns the new term, follows, catches up, and is
    // published up again: nobody restarted.
    let seen = leader_other_than(cut_off, Some(old)).await;
    assert!(cut_off.raft.metrics().borrow().current_term >= term);
    assert_eq!(leader_other_than(rest[0], Some(old)).await, seen);
    member_state(rest[0], old, NodeState::Up).await;
    applied(cut_off, last_applied(rest[0])).await;
    member_state(cut_off, old, NodeState::Up).await;
    h.stop(nodes).await;
}

#[tokio::test(start_paused = true)]
async fn a_cut_off_follower_catches_up_when_it_heals() {
    let mut h = Harness::new();
    let (net, nodes) = three(&mut h).await;
    let leader = leader_other_than(&nodes[0], None).await;
    let follower = nodes.iter().find(|n| id(n) != leader).unwrap();
    let others: Vec<IpAddr> = nodes
        .iter()
        .filter(|n| id(n) != id(follower))
        .map(ip)
        .collect();
    net.split(&[ip(follower)], &others);
    let lead = nodes.iter().find(|n| id(n) == leader).unwrap();
    member_state(lead, id(follower), NodeState::Down).await;
    let behind = last_applied(lead);
    assert!(
        last_applied(follower) < behind,
        "the cut-off side got entries"
    );

    net.heal();
    applied(follower, behind).await;
    member_state(follower, id(follower), NodeState::Up).await;
    assert_eq!(
        leader_other_than(follower, None).await,
        leader,
        "a follower's partition needs no election"
    );
    h.stop(nodes).await;
}

#[tokio::test(start_paused = true)]
async fn dropped_links_reconnect_on_their_own() {
    let mut h = Harness::new();
    let (net, nodes) = three(&mut h).await;
    let leader = leader_other_than(&nodes[0], None).await;
    let lead = nodes.iter().find(|n| id(n) == leader).unwrap();
    for round in 0..5u64 {
        // Every link of the leader is reset, again and again: each time
        // fresh links carry the next write.
        net.cut(ip(lead));
        let id = 9_000 + round;
        let member = crate::cluster::Member {
            name: format!("probe-{round}"),
            addr: "127.0.0.1:1".into(),
            role: crate::cluster::Role::Member,
        };
        lead.raft
            .client_write(crate::cluster::Command::Upsert { id, member })
            .await
            .unwrap();
    }
    let want = last_applied(lead);
    for n in &nodes {
        applied(n, want).await;
    }
    assert!(net.open_connections() > 0);
    h.stop(nodes).await;
}

#[tokio::test(start_paused = true)]
async fn a_join_stuck_in_catch_up_is_rolled_back_and_retried() {
    let mut h = Harness::new();
    let (net, nodes) = three(&mut h).await;
    let leader = leader_other_than(&nodes[0], None).await;
    let lead = nodes.iter().find(|n| id(n) == leader).unwrap();
    // d reaches the seeds, but the leader cannot replicate to it: the
    // learner never catches up.
    let d_addr = mem_addr(4);
    net.split(&[ip(lead)], &[d_addr.ip()]);
    let seeds: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let d = h.node("d", d_addr, &seeds).await;
    let d_id = id(&d);
    let has_d = |present: bool| {
        move |m: &openraft::RaftMetrics<NodeId, crate::cluster::Member>| {
            m.membership_config.membership().get_node(&d_id).is_some() == present
        }
    };
    lead.raft
        .wait(WAIT)
        .metrics(has_d(true), "learner added")
        .await
        .unwrap();
    // After the join timeout the half-finished join is rolled back.
    lead.raft
        .wait(WAIT)
        .metrics(has_d(false), "learner removed")
        .await
        .unwrap();
    net.heal();
    // The joiner's next attempt starts clean and completes.
    let all = voters(lead, 4).await;
    assert!(all.contains(&d_id));
    let [a, b, c] = nodes;
    h.stop([a, b, c, d]).await;
}

#[tokio::test(start_paused = true)]
async fn a_voter_back_with_a_wiped_disk_replaces_its_old_self() {
    let mut h = Harness::new();
    let net = MemNet::new(7);
    h.net = Some(net.clone());
    let seeds: Vec<SocketAddr> = (1..=3).map(mem_addr).collect();
    let a = h.node("a", seeds[0], &seeds).await;
    let b = h.node("b", seeds[1], &seeds).await;
    let c_stop = h.cancel.child_token();
    let c = h
        .node_as("c", seeds[2], &seeds, ClusterRole::Member, c_stop.clone())
        .await;
    voters(&a, 3).await;
    let old = id(&c);
    // c dies and its data dir is wiped.
    net.crash(ip(&c));
    c_stop.cancel();
    c.raft.shutdown().await.unwrap();
    std::fs::remove_dir_all(h.dir.path().join("c")).unwrap();
    let c = h.node("c", seeds[2], &seeds).await;
    assert_ne!(id(&c), old, "a wiped disk is a new incarnation");
    let new = id(&c);
    let m = a
        .raft
        .wait(WAIT)
        .metrics(
            |m| {
                m.membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == new)
            },
            "the new c votes",
        )
        .await
        .unwrap();
    let ms = m.membership_config.membership();
    assert!(ms.get_node(&old).is_none(), "the old c is gone: {ms:?}");
    assert_eq!(voters(&a, 3).await.len(), 3);
    for n in [&a, &b, &c] {
        let mut view = n.view.clone();
        let gone = view.wait_for(|v| !v.state.members.contains_key(&old));
        // Bounded (in paused time) so a regression fails instead of hanging.
        tokio::time::timeout(std::time::Duration::from_secs(60), gone)
            .await
            .expect("the old c leaves every view")
            .unwrap();
    }
    member_state(&a, id(&c), NodeState::Up).await;
    h.stop([a, b, c]).await;
}
