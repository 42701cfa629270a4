//! A clustered node delivers only while it holds its delivery lease: cut
//! off from the majority, it holds its queue — even mail on a route with
//! its own source address, which no group's VIP gates — and sends it once
//! it is back; and when the majority has taken its shadow copies over
//! meanwhile, it sends none of those, then or later. Three nodes, a client
//! and a sink in network namespaces.
//!
//! Needs root: compiled in with MTAD_NETNS_TESTS=1 (set by .ci/run),
//! reported as ignored otherwise.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::daemon::Daemon;
use common::lab::{arrived, send_to, Received, PATIENCE};
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

/// The lab with its sink, and n1, n2, n3 voting and delivering.
async fn start(dir: &Path) -> (Lab, Received, Vec<Daemon>) {
    let (lab, received) = common::lab::with_sink(dir);
    let mut nodes = Vec::new();
    for (name, last) in NODES {
        let cfg = config(dir, name, last);
        nodes.push(Daemon::start_in(&lab.exec(name), &cfg).await);
    }
    lab.until_voting("n1", 3);
    until_delivering(&lab, "n1", &[true, true, true]);
    (lab, received, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn a_node_cut_off_from_the_majority_holds_its_queue_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let (lab, received, mut nodes) = start(dir.path()).await;
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

/// Subjects of the mail node n3 holds when it is cut off.
const HELD: [&str; 8] = [
    "held 0", "held 1", "held 2", "held 3", "held 4", "held 5", "held 6", "held 7",
];

/// Who delivered each of `HELD`, as often as the sink got it.
fn senders(received: &Received) -> BTreeMap<&'static str, Vec<SocketAddr>> {
    let got = received.lock().unwrap().clone();
    HELD.iter()
        .map(|s| {
            let from = got
                .iter()
                .filter(|(_, t)| t.contains(&format!("Subject: {s}\r\n")));
            (*s, from.map(|(peer, _)| *peer).collect())
        })
        .collect()
}

/// Until host `on`'s queue is empty.
fn until_queue_empty(lab: &Lab, on: &str) {
    let deadline = mtad::clock::instant() + PATIENCE;
    loop {
        let out = lab.mtad(on, &["ctl", "--json", "queue", "list"]);
        let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if page["messages"].as_array().is_some_and(|m| m.is_empty()) {
            return;
        }
        assert!(mtad::clock::instant() < deadline, "{on} still queues mail");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn mail_taken_over_from_a_node_cut_off_reaches_the_sink_once_and_never_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let (lab, received, mut nodes) = start(dir.path()).await;
    let n3 = SocketAddr::from(([198, 18, 0, 3], 2525));
    let sink = [("sink", "198.18.0.20")];
    // n3 cannot reach the sink: what it acknowledges stays queued there,
    // with a shadow copy on n1 or n2.
    lab.cut(("n3", "198.18.0.3"), &sink);
    for subject in HELD {
        send_to(&lab, n3, subject);
    }
    // Cut off from the majority, then able to reach the sink again: were
    // it not fenced, it would send the held mail now.
    let majority = [("n1", "198.18.0.1"), ("n2", "198.18.0.2")];
    lab.cut(("n3", "198.18.0.3"), &majority);
    nodes[2]
        .wait_line(|l| l.contains("delivery gate shut"))
        .await;
    lab.heal(("n3", "198.18.0.3"), &sink);
    // n1 and n2 take the copies over once n3's lease is surely over, and
    // deliver them.
    for subject in HELD {
        arrived(&received, subject);
    }
    // n3's jobs came due again meanwhile and wait for the gate.
    nodes[2].wait_line(|l| l.contains("jobs wait for it")).await;
    // Back: it drops what was taken over before it may deliver again.
    lab.heal(("n3", "198.18.0.3"), &majority);
    until_delivering(&lab, "n1", &[true, true, true]);
    until_queue_empty(&lab, "n3");
    let n3_ip = std::net::IpAddr::from([198, 18, 0, 3]);
    for (subject, from) in senders(&received) {
        assert_eq!(from.len(), 1, "{subject} delivered by {from:?}");
        assert_ne!(from[0].ip(), n3_ip, "{subject} was sent by the fenced node");
    }
    for n in &mut nodes {
        let _ = n.child.start_kill();
        let _ = n.child.wait().await;
    }
}
