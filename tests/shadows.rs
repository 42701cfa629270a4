//! Shadow copies with real processes: a message acknowledged by one node
//! is on `replicas − 1` other members' disks before its "250", spread over
//! them, and gone from them once it is delivered; with `min_replicas = 2`
//! and no other member up, nothing is acknowledged (451 4.4.0) until one
//! is back.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::daemon::{
    all_delivering, all_voting, ctl, ctl_json, free_port, nodes_json, nodes_until, sample, scrape,
    Daemon,
};
use common::node::PATIENCE;
use common::peer::{Behavior, Peer};
use common::shadows::{queue_id, send, shadows, three, write_config, Addrs, Three};

/// Poll until node `name` keeps no shadows.
async fn until_no_shadows(dir: &Path, name: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = shadows(dir, name);
        if now.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} still keeps {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_are_on_another_member_until_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let hop = free_port();
    // The default: replicas = 2 with a [cluster].
    let Three { addrs, nodes, .. } = three(dir.path(), hop, "").await;

    // The next hop does not listen yet: everything stays queued.
    let mut acked = BTreeSet::new();
    for i in 0..20 {
        acked.insert(queue_id(&send(addrs[0].smtp, &format!("m{i}")).await));
    }
    // Copies are durable before "250": no waiting here.
    let b = shadows(dir.path(), "node-b");
    let c = shadows(dir.path(), "node-c");
    assert!(b.is_disjoint(&c), "one copy each: {b:?} {c:?}");
    let all: BTreeSet<u64> = b.union(&c).copied().collect();
    assert_eq!(all, acked, "every acknowledged message has its shadow");
    assert!(!b.is_empty() && !c.is_empty(), "spread: b {b:?}, c {c:?}");
    assert!(shadows(dir.path(), "node-a").is_empty());

    // ctl says the same: per member, the copies of node-a's messages it
    // keeps (as node-a recorded them, and as node-b counts its own), and
    // for a message, where its copy is.
    let rows = nodes_json(addrs[0].admin).await;
    let count = |rows: &[serde_json::Value], name: &str, field: &str| {
        let row = rows.iter().find(|r| r["name"] == name).unwrap();
        row[field].as_u64().unwrap() as usize
    };
    assert_eq!(count(&rows, "node-b", "copies_there"), b.len());
    assert_eq!(count(&rows, "node-c", "copies_there"), c.len());
    let rows = nodes_json(addrs[1].admin).await;
    assert_eq!(count(&rows, "node-a", "shadows_here"), b.len());
    let first = *b.iter().next().unwrap();
    let detail: serde_json::Value =
        ctl_json(addrs[0].admin, &["queue", "show", &format!("{first:016X}")]).await;
    assert_eq!(detail["copies"], serde_json::json!(["node-b"]), "{detail}");
    let status: serde_json::Value = ctl_json(addrs[0].admin, &["status"]).await;
    assert_eq!(status["underreplicated"], 0, "{status}");

    // The hop comes up: delivered, and the shadows are discarded.
    let sink = Peer::start_at(hop, Behavior::default()).await;
    tokio::time::timeout(PATIENCE, sink.wait_messages(20))
        .await
        .expect("all delivered");
    until_no_shadows(dir.path(), "node-b").await;
    until_no_shadows(dir.path(), "node-c").await;

    for mut n in nodes {
        let _ = n.child.start_kill();
        n.child.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_enough_members_up_nothing_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.key"),
        "shadow test secret, long enough",
    )
    .unwrap();
    let hop = free_port();
    let a = Addrs::new();
    let b = Addrs::new();
    let spool = "replicas = 2\nmin_replicas = 2";
    let cfg_a = write_config(dir.path(), "node-a", a, &[], hop, spool);
    let cfg_b = write_config(dir.path(), "node-b", b, &[a.cluster], hop, spool);
    let mut node_a = Daemon::start(&cfg_a).await;
    node_a
        .wait_line(|l| l.contains("bootstrapped a new cluster"))
        .await;

    // node-a alone: no second copy can be made.
    let reply = send(a.smtp, "refused").await;
    assert!(reply.starts_with("451 4.4.0"), "{reply}");
    node_a.wait_line(|l| l.contains("not_enough_copies")).await;

    // node-b joins: 250, with the copy on node-b.
    let mut node_b = Daemon::start(&cfg_b).await;
    nodes_until(a.admin, |rows| all_delivering(rows, 2)).await;
    let id = queue_id(&send(a.smtp, "kept").await);
    assert_eq!(shadows(dir.path(), "node-b"), BTreeSet::from([id]));

    // node-b is killed: refused again, and nothing of it is queued.
    node_b.child.start_kill().unwrap();
    node_b.child.wait().await.unwrap();
    let reply = send(a.smtp, "refused again").await;
    assert!(reply.starts_with("451 4.4.0"), "{reply}");

    // Back with its data: 250 again.
    let mut node_b = Daemon::start(&cfg_b).await;
    nodes_until(a.admin, |rows| {
        rows.len() == 2
            && rows
                .iter()
                .all(|r| r["state"] == "up" && r["delivers"] == true)
    })
    .await;
    let again = queue_id(&send(a.smtp, "kept again").await);
    assert!(shadows(dir.path(), "node-b").contains(&again));

    // Only the two acknowledged messages are queued on node-a.
    let page: serde_json::Value = common::daemon::ctl_json(a.admin, &["queue", "list"]).await;
    let queued: BTreeSet<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| u64::from_str_radix(m["id"].as_str().unwrap(), 16).unwrap())
        .collect();
    assert_eq!(queued, BTreeSet::from([id, again]));

    for n in [&mut node_a, &mut node_b] {
        let _ = n.child.start_kill();
        n.child.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_share_is_copied_to_another_member() {
    let dir = tempfile::tempdir().unwrap();
    let hop = free_port();
    let Three {
        addrs, mut nodes, ..
    } = three(dir.path(), hop, "").await;
    let mut acked = BTreeSet::new();
    for i in 0..20 {
        acked.insert(queue_id(&send(addrs[0].smtp, &format!("m{i}")).await));
    }
    let on_c = shadows(dir.path(), "node-c");
    assert!(!on_c.is_empty(), "spread");

    // node-c dies for good: its share is copied to node-b, the only
    // member left to hold copies, and node-a's count of messages short of
    // a copy goes back to 0.
    nodes[2].child.start_kill().unwrap();
    nodes[2].child.wait().await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let b = shadows(dir.path(), "node-b");
        let short = sample(
            &scrape(addrs[0].admin).await,
            "mtad_queue_underreplicated",
            &[],
        );
        if b == acked && short == Some(0.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node-b holds {} of {}; under-replicated {short:?}",
            b.len(),
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for mut n in nodes {
        let _ = n.child.start_kill();
        n.child.wait().await.unwrap();
    }
}

/// node-a's `mtad_queue_underreplicated`, once it is `want`.
async fn until_underreplicated(admin: SocketAddr, want: f64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = sample(&scrape(admin).await, "mtad_queue_underreplicated", &[]);
        if now == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "under-replicated {now:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_short_of_a_copy_are_counted_until_the_holder_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let hop = free_port();
    // A copy on every member: none is left to replace one.
    let Three {
        addrs,
        configs: cfgs,
        mut nodes,
    } = three(dir.path(), hop, "replicas = 3").await;
    let mut acked = BTreeSet::new();
    for i in 0..10 {
        acked.insert(queue_id(&send(addrs[0].smtp, &format!("m{i}")).await));
    }
    assert_eq!(shadows(dir.path(), "node-b"), acked);
    assert_eq!(shadows(dir.path(), "node-c"), acked);
    until_underreplicated(addrs[0].admin, 0.0).await;

    nodes[2].child.start_kill().unwrap();
    nodes[2].child.wait().await.unwrap();
    until_underreplicated(addrs[0].admin, 10.0).await;
    let (ok, summary) = ctl(addrs[0].admin, &["queue", "summary"]).await;
    assert!(ok, "{summary}");
    assert!(
        summary.contains("copies: 10 message(s) short of a copy on other members"),
        "{summary}"
    );

    // Back with its copies: whole again, nothing copied twice.
    nodes[2] = Daemon::start(&cfgs[2]).await;
    until_underreplicated(addrs[0].admin, 0.0).await;
    assert_eq!(shadows(dir.path(), "node-c"), acked);
    for mut n in nodes {
        let _ = n.child.start_kill();
        n.child.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_stops_on_purpose_leaves_no_shadow_of_what_it_delivered() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.key"),
        "shadow test secret, long enough",
    )
    .unwrap();
    let sink = Peer::start(Behavior::default()).await;
    let addrs: Vec<Addrs> = (0..2).map(|_| Addrs::new()).collect();
    let cfg_a = write_config(dir.path(), "node-a", addrs[0], &[], sink.addr, "");
    let cfg_b = write_config(
        dir.path(),
        "node-b",
        addrs[1],
        &[addrs[0].cluster],
        sink.addr,
        "",
    );
    let mut a = Daemon::start(&cfg_a).await;
    let mut b = Daemon::start(&cfg_b).await;
    nodes_until(addrs[0].admin, |rows| all_voting(rows, 2)).await;
    for i in 0..20 {
        queue_id(&send(addrs[0].smtp, &format!("m{i}")).await);
    }
    tokio::time::timeout(PATIENCE, sink.wait_messages(20))
        .await
        .expect("all delivered");
    // At once, before a batch of progress would be due: the stop sends it.
    a.signal(libc::SIGTERM);
    a.child.wait().await.unwrap();
    assert_eq!(shadows(dir.path(), "node-b"), BTreeSet::new());
    let _ = b.child.start_kill();
    b.child.wait().await.unwrap();
}
