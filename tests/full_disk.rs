//! A full disk, for real: the spool and a node on a small ext4 filesystem
//! on a loop device, filled up by another file. Nothing is acknowledged
//! that is not on disk, the spool refuses before the disk is full (452
//! 4.3.1 at the SMTP level), a write that meets ENOSPC anyway costs no
//! new segment, and all is well once space is freed.
//!
//! Needs root: compiled in with MTAD_NETNS_TESTS=1 (set by .ci/run),
//! reported as ignored otherwise.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::client::Client;
use common::loopfs::LoopFs;
use common::node::{config, eml_files, start, wait_for};
use mtad::spool::disk::{DiskSpool, Limits};
use mtad::spool::{Envelope, QueueId, RcptState, Recipient, Spool, SpoolError};

fn envelope(id: u64) -> Envelope {
    Envelope {
        id: QueueId(id),
        sender: "s@example.test".into(),
        recipients: vec![Recipient {
            address: "r@dest.example".into(),
            state: RcptState::Pending { attempts: 0 },
        }],
        arrived_ms: 1,
        holders: Vec::new(),
    }
}

fn body(id: u64) -> Bytes {
    Bytes::from(format!("Subject: {id}\r\n\r\n{}\r\n", "z".repeat(32 << 10)))
}

fn segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let p = e.as_ref().unwrap().path();
            p.extension().is_some_and(|x| x == "seg")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn enospc_acknowledges_nothing_costs_no_segments_and_heals() {
    let fs = LoopFs::new(24).unwrap_or_else(|e| panic!("loop filesystem: {e}"));
    let dir = fs.path().join("spool");
    let limits = Limits {
        segment_bytes: 1 << 20,
        ..Limits::default()
    };
    let spool = Arc::new(DiskSpool::open_with(&dir, limits).unwrap());
    let filler = fs.fill(512 << 10);
    // Until the disk itself says no: every refusal is Full, never a
    // panic, never an acknowledgement of what is not there.
    let mut acked = Vec::new();
    let mut refusals = 0;
    for id in 1..=200 {
        match spool.store(envelope(id), body(id)).await {
            Ok(()) => acked.push(id),
            Err(SpoolError::Full) => refusals += 1,
            Err(e) => panic!("message {id}: {e}"),
        }
    }
    assert!(
        refusals > 100,
        "the disk never filled: {} stored",
        acked.len()
    );
    assert!(
        segments(&dir) <= 3,
        "failed writes piled up segments: {}",
        segments(&dir)
    );
    // Space again: the spool goes on in the same segment.
    std::fs::remove_file(filler).unwrap();
    for id in 1000..1010 {
        spool.store(envelope(id), body(id)).await.unwrap();
        acked.push(id);
    }
    drop(spool);
    let spool = DiskSpool::open_with(&dir, limits).unwrap();
    let recovered: Vec<u64> = spool.recovered().iter().map(|r| r.envelope.id.0).collect();
    assert_eq!(recovered, acked, "exactly what was acknowledged");
    for &id in &acked {
        assert_eq!(spool.body(QueueId(id)).await.unwrap(), body(id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn a_node_on_a_nearly_full_disk_answers_452_and_recovers() {
    let fs = LoopFs::new(32).unwrap_or_else(|e| panic!("loop filesystem: {e}"));
    let outbox = fs.path().join("outbox");
    let routes = format!(
        "[[route]]\ndomains = [\"*\"]\ndrop_dir = \"{}\"\n",
        outbox.display()
    );
    let node = start(config(
        fs.path(),
        "relay_networks = [\"127.0.0.0/8\"]",
        &routes,
    ))
    .await;
    let send = |subject: &'static str| {
        let addr = node.smtp_addrs()[0];
        async move {
            let mut c = Client::connect(addr).await.unwrap();
            let body = format!("Subject: {subject}\r\n\r\nhello\r\n");
            c.send("a@example.test", &["b@dest.example"], &body)
                .await
                .unwrap()
        }
    };
    assert!(send("before").await.starts_with("250"));
    wait_for(&node, "the first delivery", |s| s.delivered == 1).await;
    // Less free than the spool's reserve: refused before the disk is full.
    let filler = fs.fill(256 << 10);
    let reply = send("while full").await;
    assert!(reply.starts_with("452 4.3.1"), "{reply}");
    std::fs::remove_file(filler).unwrap();
    let reply = send("after").await;
    assert!(reply.starts_with("250"), "{reply}");
    wait_for(&node, "the second delivery", |s| s.delivered == 2).await;
    assert_eq!(eml_files(&outbox).len(), 2, "the refused one never went");
    node.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn the_cluster_log_waits_for_room_on_a_full_disk_and_goes_on() {
    use mtad::cluster::raft::store::LogStore;
    use mtad::cluster::state::{Command, Member, Role, TypeConfig};
    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::log_id;
    use openraft::{Entry, EntryPayload, RaftLogReader};

    // Entries large enough that each needs new blocks of the disk.
    let entry = |index: u64| Entry::<TypeConfig> {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(Command::Upsert {
            id: index,
            member: Member {
                name: "n".repeat(16 << 10),
                addr: "127.0.0.1:7400".into(),
                role: Role::Member,
            },
        }),
    };
    let fs = LoopFs::new(16).unwrap_or_else(|e| panic!("loop filesystem: {e}"));
    let dir = fs.path().join("cluster");
    let mut log = LogStore::open(&dir).unwrap();
    log.blocking_append([entry(1)]).await.unwrap();
    let filler = fs.fill(0);
    // openraft stops for good at a storage error: the write must wait.
    let writing = tokio::spawn(async move {
        let r = log.blocking_append([entry(2), entry(3)]).await;
        (log, r)
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!writing.is_finished(), "the append gave up on a full disk");
    std::fs::remove_file(filler).unwrap();
    let (mut log, r) = writing.await.unwrap();
    r.unwrap();
    log.blocking_append([entry(4)]).await.unwrap();
    drop(log);
    let mut log = LogStore::open(&dir).unwrap();
    let got: Vec<u64> = log
        .try_get_log_entries(0..)
        .await
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect();
    assert_eq!(got, [1, 2, 3, 4]);
}
