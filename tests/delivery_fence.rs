//! A clustered node delivers only while it holds its delivery lease: cut
//! off from the majority, it holds its queue — even mail on a route with
//! its own source address, which no group's VIP gates — and sends it once
//! it is back. Three nodes, a client and a sink in network namespaces.
//!
//! Needs root: compiled in with MTAD_NETNS_TESTS=1 (set by .ci/run),
//! reported as ignored otherwise.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::daemon::Daemon;
use common::lab::{arrived, send_to, PATIENCE};
use common::netns::{node_config, Lab, NODES, SINK};

/// Node `name`'s lab config, its route leaving from its own address.
fn config(dir: &Path, name: &str, last: u8) -> PathBuf {
    let path = node_config(dir, name, last, "", "info");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("next_hops = [\"{SINK}\"]"),
        &format!("next_hops = [\"{SINK}\"]\nsource_address = \"198.18.0.{last}\""),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Until `ctl nodes` on host `on` says which of n1, n2, n3 deliver.
fn until_delivering(lab: &Lab, on: &str, want: &[bool]) {
    let deadline = mtad::clock::instant() + PATIENCE;
    loop {
        let mut rows = lab.nodes(on);
        rows.sort_by_key(|r| r["name"].as_str().unwrap_or("").to_string());
        let delivers: Vec<bool> = rows.iter().map(|r| r["delivers"] == true).collect();
        if delivers == want {
            return;
        }
        assert!(
            mtad::clock::instant() < deadline,
            "never delivering as {want:?}: {rows:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn a_node_cut_off_from_the_majority_holds_its_queue_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let (lab, received) = common::lab::with_sink(dir.path());
    let mut nodes = Vec::new();
    for (name, last) in NODES {
        let cfg = config(dir.path(), name, last);
        nodes.push(Daemon::start_in(&lab.exec(name), &cfg).await);
    }
    lab.until_voting("n1", 3);
    until_delivering(&lab, "n1", &[true, true, true]);
    let n3 = SocketAddr::from(([198, 18, 0, 3], 2525));
    // Delivering, it sends at once.
    nodes[2]
        .wait_line(|l| l.contains("delivery gate open"))
        .await;
    send_to(&lab, n3, "before the cut");
    arrived(&received, "before the cut");
    let cut = [("n1", "198.18.0.1"), ("n2", "198.18.0.2")];
    lab.cut(("n3", "198.18.0.3"), &cut);
    nodes[2]
        .wait_line(|l| l.contains("delivery gate shut"))
        .await;
    // The majority sees it fenced: its delivery epoch was taken back.
    until_delivering(&lab, "n1", &[true, true, false]);
    send_to(&lab, n3, "while cut off");
    nodes[2].wait_line(|l| l.contains("jobs wait for it")).await;
    // It waits, and cannot stop waiting while cut off: the lease needs
    // the majority's grants.
    let sent = received
        .lock()
        .unwrap()
        .iter()
        .any(|(_, m)| m.contains("while cut off"));
    assert!(!sent, "a fenced node delivered");
    lab.heal(("n3", "198.18.0.3"), &cut);
    arrived(&received, "while cut off");
    until_delivering(&lab, "n1", &[true, true, true]);
    for n in &mut nodes {
        let _ = n.child.start_kill();
        let _ = n.child.wait().await;
    }
}
