//! Joining a running cluster through any member, idempotently, and coming
//! back with a wiped data dir.

use std::collections::BTreeSet;

use super::*;
use crate::cluster::rpc::{JoinReply, JoinRequest};

/// Start three voters and return them with their addresses and the leader.
async fn three(dirs: &[tempfile::TempDir]) -> (Vec<Peer>, Vec<SocketAddr>, NodeId) {
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(l.local_addr().unwrap());
        nodes.push(start(i as NodeId + 1, l, dir.path()).await);
    }
    let voters: BTreeMap<NodeId, Member> = (1..=3)
        .map(|id| (id, member(id, addrs[id as usize - 1])))
        .collect();
    nodes[0].raft.initialize(voters).await.unwrap();
    let leader = nodes[0].leader_other_than(None).await;
    (nodes, addrs, leader)
}

fn request(name: &str, id: NodeId, addr: SocketAddr) -> Request {
    Request::Join(JoinRequest {
        name: name.into(),
        incarnation: id,
        addr,
        role: Role::Member,
        generation: 0,
        start: 0,
    })
}

/// Ask `sponsor` to admit `req`'s node, again while it says to retry (a
/// follower that has not heard from a new leader yet), as joiners do.
async fn join_via(sponsor: SocketAddr, req: Request) -> JoinReply {
    let client = PeerClient::new(sponsor, cfg("joiner", 999), None);
    for _ in 0..100 {
        match client.call(req.clone(), LONG).await.unwrap() {
            Reply::Join(JoinReply::Retry { .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Reply::Join(r) => return r,
            other => panic!("{other:?}"),
        }
    }
    panic!("the sponsor never stopped asking to retry");
}

/// Waits for a settled membership of these voters and learners.
async fn membership(node: &Peer, voters: &[NodeId], learners: &[NodeId]) {
    let voters: BTreeSet<NodeId> = voters.iter().copied().collect();
    let learners: BTreeSet<NodeId> = learners.iter().copied().collect();
    node.raft
        .wait(WAIT)
        .metrics(
            // Settled: not in the joint phase of a membership change.
            |m| {
                let ms = m.membership_config.membership();
                ms.get_joint_config().len() == 1
                    && ms.voter_ids().collect::<BTreeSet<_>>() == voters
                    && ms.learner_ids().collect::<BTreeSet<_>>() == learners
            },
            "membership",
        )
        .await
        .unwrap_or_else(|e| panic!("never voters {voters:?} and learners {learners:?}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_through_a_follower_and_a_wiped_node_replaces_its_entry() {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, addrs, leader) = three(&dirs[..3]).await;
    let follower = addrs[if leader == 1 { 1 } else { 0 }];

    // A fourth node, fresh, joins through a follower (forwarded to the
    // leader) and catches up as a learner with a voter slot waiting (the
    // failure detector, not running here, would promote it).
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a4 = l.local_addr().unwrap();
    let mut n4 = start_named(4, "n4", l, dirs[3].path()).await;
    let reply = join_via(follower, request("n4", 4, a4)).await;
    assert_eq!(reply, JoinReply::Admitted { voter: true });
    n4.applied(4).await;
    membership(&nodes[0], &[1, 2, 3], &[4]).await;

    // Asking again (as after a cut connection) changes nothing.
    let reply = join_via(follower, request("n4", 4, a4)).await;
    assert_eq!(reply, JoinReply::Admitted { voter: true });
    membership(&nodes[0], &[1, 2, 3], &[4]).await;

    // n4 loses its disk: it comes back as a newer incarnation under the
    // same name and replaces its stale entry, no restart of anyone.
    n4.stop().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a40 = l.local_addr().unwrap();
    let mut n40 = start_named(40, "n4", l, dirs[4].path()).await;
    let reply = join_via(follower, request("n4", 40, a40)).await;
    assert_eq!(reply, JoinReply::Admitted { voter: true });
    n40.applied(40).await;
    membership(&nodes[0], &[1, 2, 3], &[40]).await;
    for n in &mut nodes {
        n.view
            .wait_for(|v| !v.state.members.contains_key(&4))
            .await
            .unwrap();
    }

    // The old disk brought back is refused, with the reason.
    let reply = join_via(follower, request("n4", 4, a4)).await;
    assert!(
        matches!(&reply, JoinReply::Refused { reason } if reason.contains("newer incarnation 40")),
        "{reply:?}"
    );

    n40.stop().await;
    for n in nodes {
        n.stop().await;
    }
}
