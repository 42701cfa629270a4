//! openraft's storage suite against our store, plus crash/restart tests.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{blank_ent, log_id, membership_ent, StoreBuilder, Suite};
use openraft::{Entry, EntryPayload, RaftLogReader, RaftSnapshotBuilder, StorageError, Vote};
use tempfile::TempDir;

use super::{open, LogStore, StateMachine, StoreError};
use crate::cluster::state::{Command, Member, NodeId, NodeState, Role, TypeConfig};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    // The suite makes its own runtime per test case, so this is a plain test.
    Suite::test_all(Builder).expect("openraft storage suite");
}

fn upsert(term: u64, index: u64, id: NodeId, name: &str) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(Command::Upsert {
            id,
            member: Member {
                name: name.into(),
                addr: format!("127.0.0.{id}:7400"),
                role: Role::Member,
            },
        }),
    }
}

fn blanks(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
    range.map(|i| blank_ent::<TypeConfig>(term, 1, i)).collect()
}

async fn indexes(log: &mut LogStore) -> Vec<(u64, u64)> {
    let all = log.try_get_log_entries(0..).await.unwrap();
    all.iter()
        .map(|e| (e.log_id.leader_id.term, e.log_id.index))
        .collect()
}

fn log_file(dir: &Path) -> std::path::PathBuf {
    dir.join("raft-log")
}

#[tokio::test]
async fn restart_recovers_vote_log_purge_truncate_committed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        log.save_vote(&Vote::new(3, 7)).await.unwrap();
        log.blocking_append(blanks(1, 1..=9)).await.unwrap();
        log.blocking_append([upsert(1, 10, 7, "a")]).await.unwrap();
        log.truncate(log_id(1, 1, 8)).await.unwrap();
        log.blocking_append([upsert(2, 8, 7, "a"), blank_ent::<TypeConfig>(2, 1, 9)])
            .await
            .unwrap();
        log.purge(log_id(1, 1, 3)).await.unwrap();
        log.save_committed(Some(log_id(2, 1, 8))).await.unwrap();
    }
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 7)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 1, 8)));
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(log_id(1, 1, 3)));
    assert_eq!(st.last_log_id, Some(log_id(2, 1, 9)));
    let expect: Vec<(u64, u64)> = (4..=7).map(|i| (1, i)).chain([(2, 8), (2, 9)]).collect();
    assert_eq!(indexes(&mut log).await, expect);
    let e8 = log.try_get_log_entries(8..9).await.unwrap();
    assert!(matches!(
        &e8[0].payload,
        EntryPayload::Normal(Command::Upsert { id: 7, .. })
    ));
}

#[tokio::test]
async fn torn_tail_is_dropped_and_appends_after_it_survive() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        log.blocking_append(blanks(1, 1..=3)).await.unwrap();
    }
    // A crash mid-append: half a frame header and some payload bytes.
    let mut f = OpenOptions::new()
        .append(true)
        .open(log_file(dir.path()))
        .unwrap();
    f.write_all(&[40, 0, 0, 0, 0xde, 0xad, b'{', b'"']).unwrap();
    drop(f);
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut log).await, vec![(1, 1), (1, 2), (1, 3)]);
        log.blocking_append(blanks(1, 4..=4)).await.unwrap();
    }
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(
        indexes(&mut log).await,
        vec![(1, 1), (1, 2), (1, 3), (1, 4)]
    );
}

#[tokio::test]
async fn cut_inside_last_frame_drops_only_that_entry() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        log.blocking_append(blanks(1, 1..=3)).await.unwrap();
    }
    let path = log_file(dir.path());
    let len = std::fs::metadata(&path).unwrap().len();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![(1, 1), (1, 2)]);
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_log_id, Some(log_id(1, 1, 2)));
}

#[tokio::test]
async fn compaction_keeps_live_entries_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let before;
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        log.blocking_append(blanks(1, 1..=20)).await.unwrap();
        log.truncate(log_id(1, 1, 18)).await.unwrap();
        log.purge(log_id(1, 1, 10)).await.unwrap();
        before = std::fs::metadata(log_file(dir.path())).unwrap().len();
        log.compact().unwrap();
        // The append handle must follow the rewritten file.
        log.blocking_append(blanks(2, 18..=18)).await.unwrap();
    }
    assert!(std::fs::metadata(log_file(dir.path())).unwrap().len() < before);
    let mut log = LogStore::open(dir.path()).unwrap();
    let expect: Vec<(u64, u64)> = (11..=17).map(|i| (1, i)).chain([(2, 18)]).collect();
    assert_eq!(indexes(&mut log).await, expect);
}

#[tokio::test]
async fn purge_past_the_end_then_append_survives_restart() {
    // After installing a snapshot, openraft purges beyond the last entry and
    // appends from there: the gap in the file must not read as corruption.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        log.blocking_append(blanks(1, 1..=3)).await.unwrap();
        log.purge(log_id(2, 1, 10)).await.unwrap();
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_log_id, Some(log_id(2, 1, 10)));
        log.blocking_append(blanks(2, 11..=12)).await.unwrap();
    }
    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log).await, vec![(2, 11), (2, 12)]);
}

#[test]
fn damaged_meta_is_an_error_not_a_reset() {
    // Losing the vote silently could let this node vote twice in a term.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("raft-meta"), b"garbage").unwrap();
    assert!(matches!(
        LogStore::open(dir.path()),
        Err(StoreError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn snapshot_survives_restart_and_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let voters = BTreeSet::from([1, 2]);
    let built = {
        let mut sm = StateMachine::open(dir.path()).unwrap();
        let replies = sm
            .apply([
                membership_ent::<TypeConfig>(1, 1, 1, vec![voters.clone()]),
                upsert(1, 2, 1, "a"),
                upsert(1, 3, 2, "b"),
                upsert(1, 4, 3, "a"),
            ])
            .await
            .unwrap();
        assert_eq!(replies.len(), 4);
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        // Applied after the snapshot: lost on restart, replayed from the log.
        sm.apply([upsert(1, 5, 4, "c")]).await.unwrap();
        snap
    };
    let mut sm = StateMachine::open(dir.path()).unwrap();
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 1, 4)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1, 1)));
    let ids: Vec<NodeId> = sm.state().members.keys().copied().collect();
    assert_eq!(ids, vec![2, 3], "stale incarnation 1 of \"a\" was replaced");
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built.meta);

    // Install on a fresh follower; it too must come back after a restart.
    let dir2 = tempfile::tempdir().unwrap();
    {
        let mut follower = StateMachine::open(dir2.path()).unwrap();
        let rx = follower.subscribe();
        let mut data = follower.begin_receiving_snapshot().await.unwrap();
        *data = *current.snapshot;
        follower
            .install_snapshot(&current.meta, data)
            .await
            .unwrap();
        assert_eq!(rx.borrow().last_applied, Some(log_id(1, 1, 4)));
        assert_eq!(rx.borrow().state.members.len(), 2);
    }
    let mut follower = StateMachine::open(dir2.path()).unwrap();
    assert_eq!(
        follower.applied_state().await.unwrap(),
        (Some(log_id(1, 1, 4)), membership)
    );
    assert_eq!(follower.state(), sm.state());
}

#[tokio::test]
async fn apply_publishes_state_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::open(dir.path()).unwrap();
    let rx = sm.subscribe();
    sm.apply([
        upsert(1, 1, 9, "n"),
        Entry {
            log_id: log_id(1, 1, 2),
            payload: EntryPayload::Normal(Command::SetState {
                id: 9,
                state: NodeState::Down,
                at_ms: 1234,
                from: None,
            }),
        },
    ])
    .await
    .unwrap();
    let view = rx.borrow().clone();
    assert_eq!(view.last_applied, Some(log_id(1, 1, 2)));
    let m = &view.state.members[&9];
    assert_eq!((m.state, m.since_ms), (NodeState::Down, 1234));
}
