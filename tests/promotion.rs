//! Promotion with real processes: a member that dies with mail it
//! acknowledged and had not delivered loses none of it — the members that
//! hold its shadow copies deliver them once the cluster has fenced it —
//! and when it comes back with its old disk it delivers none of them a
//! second time.
//!
//! Checked from outside: the subjects the sink received against the
//! messages a client got "250" for.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::daemon::{all_delivering, ctl_json, free_port, nodes_until, Daemon};
use common::node::PATIENCE;
use common::peer::{Behavior, Peer};
use common::shadows::{data_dir, queue_id, send, shadows, three, Addrs, Three};

/// How many messages node-a acknowledges before it dies.
const MESSAGES: usize = 20;

/// Three members, node-a first; their next hop (`hop`) is not up.
struct Trio {
    dir: tempfile::TempDir,
    addrs: Vec<Addrs>,
    configs: Vec<std::path::PathBuf>,
    nodes: Vec<Option<Daemon>>,
    hop: SocketAddr,
}

impl Trio {
    async fn start() -> Trio {
        let dir = tempfile::tempdir().unwrap();
        let hop = free_port();
        let Three {
            addrs,
            configs,
            nodes,
        } = three(dir.path(), hop, "").await;
        Trio {
            dir,
            addrs,
            configs,
            nodes: nodes.into_iter().map(Some).collect(),
            hop,
        }
    }

    /// node-a acknowledges `MESSAGES` messages; their subjects.
    async fn fill(&self) -> BTreeSet<String> {
        let mut subjects = BTreeSet::new();
        for i in 0..MESSAGES {
            let subject = format!("m{i}");
            queue_id(&send(self.addrs[0].smtp, &subject).await);
            subjects.insert(subject);
        }
        // Each is on one other member's disk before its 250.
        let held =
            shadows(self.dir.path(), "node-b").len() + shadows(self.dir.path(), "node-c").len();
        assert_eq!(held, MESSAGES);
        subjects
    }

    /// SIGKILL node `i`.
    async fn kill(&mut self, i: usize) {
        let mut n = self.nodes[i].take().unwrap();
        n.child.start_kill().unwrap();
        n.child.wait().await.unwrap();
    }

    /// Wait until node-b and node-c queue `n` messages between them:
    /// node-a's copies are theirs now.
    async fn until_taken_over(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let mut queued = 0;
            for at in &self.addrs[1..] {
                queued += queued_ids(at.admin).await.len();
            }
            if queued == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node-b and node-c queue {queued}, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until node `i`'s queue is empty.
    async fn until_empty(&self, i: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !queued_ids(self.addrs[i].admin).await.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {i} still queues mail"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until every running node's queue is empty: whatever it would
    /// deliver, it has.
    async fn until_all_sent(&self) {
        for i in 0..self.addrs.len() {
            if self.nodes[i].is_some() {
                self.until_empty(i).await;
            }
        }
    }

    async fn stop(mut self) {
        for n in self.nodes.iter_mut().flatten() {
            let _ = n.child.start_kill();
            n.child.wait().await.unwrap();
        }
    }
}

/// The ids a node queues, read through its admin API.
async fn queued_ids(admin: SocketAddr) -> Vec<String> {
    let page: serde_json::Value = ctl_json(admin, &["queue", "list"]).await;
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// How often the sink received each subject.
fn received(sink: &Peer) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for m in sink.messages() {
        let text = String::from_utf8_lossy(&m.body).to_string();
        let subject = text
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap_or("")
            .to_string();
        *seen.entry(subject).or_insert(0) += 1;
    }
    seen
}

/// Every subject in `sent` exactly once, nothing else.
fn assert_once(sink: &Peer, sent: &BTreeSet<String>) {
    let seen = received(sink);
    let missing: Vec<_> = sent.iter().filter(|s| !seen.contains_key(*s)).collect();
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty(),
        "acknowledged, never delivered: {missing:?}"
    );
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(seen.len(), sent.len(), "{seen:?}");
}

fn wipe(dir: &Path) {
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_dies_with_its_disk_loses_no_acknowledged_message() {
    let mut trio = Trio::start().await;
    let sent = trio.fill().await;

    // node-a and its disk are gone for good.
    trio.kill(0).await;
    let killed = tokio::time::Instant::now();
    wipe(&data_dir(trio.dir.path(), "node-a"));
    trio.until_taken_over(MESSAGES).await;

    let sink = Peer::start_at(trio.hop, Behavior::default()).await;
    tokio::time::timeout(PATIENCE, sink.wait_messages(MESSAGES))
        .await
        .expect("every acknowledged message delivered");
    // Not a measure (the sink came up only after the takeover): shown to
    // tell a slow fence from a slow delivery when the test is slow.
    eprintln!("kill to takeover and delivery: {:?}", killed.elapsed());
    trio.until_all_sent().await;
    assert_once(&sink, &sent);
    trio.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_back_with_its_old_disk_delivers_nothing_that_was_taken_over() {
    let mut trio = Trio::start().await;
    let sent = trio.fill().await;

    trio.kill(0).await;
    trio.until_taken_over(MESSAGES).await;

    // Back with every message still on its disk: it drops them (node-b
    // and node-c have them now) before it may deliver.
    trio.nodes[0] = Some(Daemon::start(&trio.configs[0]).await);
    nodes_until(trio.addrs[1].admin, |rows| all_delivering(rows, 3)).await;
    trio.until_empty(0).await;

    // New mail through it is acknowledged (copied again) and delivered.
    let mut all = sent.clone();
    for i in 0..5 {
        let subject = format!("after{i}");
        queue_id(&send(trio.addrs[0].smtp, &subject).await);
        all.insert(subject);
    }
    let sink = Peer::start_at(trio.hop, Behavior::default()).await;
    tokio::time::timeout(PATIENCE, sink.wait_messages(all.len()))
        .await
        .expect("every acknowledged message delivered");
    trio.until_all_sent().await;
    assert_once(&sink, &all);
    trio.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_back_with_a_wiped_disk_is_a_new_member_and_nothing_is_lost() {
    let mut trio = Trio::start().await;
    let sent = trio.fill().await;

    // Killed and restarted at once on an empty data dir: a new
    // incarnation under the same name, which the old one's copies must
    // not wait for.
    trio.kill(0).await;
    wipe(&data_dir(trio.dir.path(), "node-a"));
    trio.nodes[0] = Some(Daemon::start(&trio.configs[0]).await);
    trio.until_taken_over(MESSAGES).await;

    let sink = Peer::start_at(trio.hop, Behavior::default()).await;
    tokio::time::timeout(PATIENCE, sink.wait_messages(MESSAGES))
        .await
        .expect("every acknowledged message delivered");
    trio.until_all_sent().await;
    assert_once(&sink, &sent);
    trio.stop().await;
}
