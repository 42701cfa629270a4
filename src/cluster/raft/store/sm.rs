//! The raft state machine over [`ClusterState`], with durable snapshots.
//!
//! `apply` only changes memory: the state machine is rebuilt on restart from
//! the last snapshot, and openraft replays the committed log after it. So the
//! snapshot is the one thing that must be durable, and it is written
//! atomically to `raft-snapshot` (two frames: metadata, then data).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::record;
use super::StoreError;
use crate::cluster::state::{ClusterState, Member, NodeId, Response, TypeConfig};

const SNAPSHOT_FILE: &str = "raft-snapshot";

/// What a snapshot's data holds: everything `applied_state` reports, plus the
/// cluster state itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SmData {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, Member>,
    state: ClusterState,
}

/// A built or installed snapshot, kept in memory to serve to followers.
#[derive(Debug, Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

/// The latest snapshot. An async lock: it is held while the file is
/// written, which may wait for room on a full disk.
type Slot = Arc<tokio::sync::Mutex<Option<StoredSnapshot>>>;

async fn lock(slot: &Slot) -> tokio::sync::MutexGuard<'_, Option<StoredSnapshot>> {
    slot.lock().await
}

/// `persist`, waiting for room on a full disk.
async fn persist_durably(dir: &Path, snap: &StoredSnapshot) -> std::io::Result<()> {
    super::until_room("cluster snapshot", || persist(dir, snap)).await
}

/// The cluster state as of a log position, published after every change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// The last log id applied (None before anything was).
    pub last_applied: Option<LogId<NodeId>>,
    /// The state after applying it.
    pub state: ClusterState,
}

/// The raft state machine: cluster state in memory, snapshots on disk.
pub struct StateMachine {
    dir: PathBuf,
    data: SmData,
    snapshot: Slot,
    published: watch::Sender<ClusterView>,
}

/// Builds a snapshot from a copy of the state taken when it was requested, so
/// applying can go on while it is written.
pub struct SnapshotBuilder {
    dir: PathBuf,
    data: SmData,
    snapshot: Slot,
}

fn snapshot_error(
    meta: Option<&SnapshotMeta<NodeId, Member>>,
    verb: ErrorVerb,
    e: impl Into<openraft::AnyError>,
) -> StorageError<NodeId> {
    let sig = meta.map(|m| m.signature());
    StorageIOError::new(ErrorSubject::Snapshot(sig), verb, e).into()
}

/// Writes the snapshot file atomically: the old one or the new one survives a
/// crash, never a mix.
fn persist(dir: &Path, snap: &StoredSnapshot) -> std::io::Result<()> {
    let meta = serde_json::to_vec(&snap.meta).expect("snapshot meta always serializes");
    let mut buf = Vec::with_capacity(meta.len() + snap.data.len() + 2 * record::HEADER);
    record::encode_into(&mut buf, &meta);
    record::encode_into(&mut buf, &snap.data);
    record::write_atomic(dir, SNAPSHOT_FILE, &buf)
}

/// Reads the snapshot file back: its stored form and the decoded data.
fn load(dir: &Path) -> Result<Option<(StoredSnapshot, SmData)>, StoreError> {
    let path = dir.join(SNAPSHOT_FILE);
    let Some(bytes) =
        record::read_optional(dir, SNAPSHOT_FILE).map_err(|e| StoreError::io(&path, e))?
    else {
        return Ok(None);
    };
    // Written atomically, so anything but two intact frames is real damage.
    let scan = record::scan(&bytes);
    if scan.frames.len() != 2 || scan.valid_len != bytes.len() {
        return Err(StoreError::corrupt(&path, "not two intact frames".into()));
    }
    let corrupt = |e: serde_json::Error| StoreError::corrupt(&path, e.to_string());
    let meta: SnapshotMeta<NodeId, Member> =
        serde_json::from_slice(scan.frames[0]).map_err(corrupt)?;
    let data: SmData = serde_json::from_slice(scan.frames[1]).map_err(corrupt)?;
    let stored = StoredSnapshot {
        meta,
        data: scan.frames[1].to_vec(),
    };
    Ok(Some((stored, data)))
}

impl StateMachine {
    /// Opens (creating if needed) the state machine in `dir`, restoring the
    /// last snapshot if there is one.
    pub fn open(dir: impl AsRef<Path>) -> Result<StateMachine, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        super::ensure_dir(&dir)?;
        let (snapshot, data) = match load(&dir)? {
            Some((stored, data)) => (Some(stored), data),
            None => (None, SmData::default()),
        };
        let view = ClusterView {
            last_applied: data.last_applied,
            state: data.state.clone(),
        };
        Ok(StateMachine {
            dir,
            data,
            snapshot: Arc::new(tokio::sync::Mutex::new(snapshot)),
            published: watch::Sender::new(view),
        })
    }

    /// A receiver of the cluster state as it changes; readers (admin, group
    /// manager) never wait on raft.
    pub fn subscribe(&self) -> watch::Receiver<ClusterView> {
        self.published.subscribe()
    }

    /// The current cluster state.
    pub fn state(&self) -> &ClusterState {
        &self.data.state
    }

    fn publish(&self) {
        self.published.send_replace(ClusterView {
            last_applied: self.data.last_applied,
            state: self.data.state.clone(),
        });
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let data = serde_json::to_vec(&self.data).expect("state always serializes");
        // Unique per build even for the same log id: openraft uses the id to
        // tell snapshot transfers apart.
        let nanos = crate::clock::since_epoch().as_nanos();
        let last = self.data.last_applied;
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{nanos}", l.leader_id.term, l.index),
            None => format!("none-{nanos}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: self.data.last_membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot { meta, data };
        {
            let mut slot = lock(&self.snapshot).await;
            // A snapshot installed from the leader while this one was being
            // built may be newer; never replace newer with older.
            let newer_exists = slot.as_ref().is_some_and(|s| s.meta.last_log_id > last);
            if !newer_exists {
                persist_durably(&self.dir, &stored)
                    .await
                    .map_err(|e| snapshot_error(Some(&stored.meta), ErrorVerb::Write, &e))?;
                *slot = Some(stored.clone());
            }
        }
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError<NodeId>>
    {
        Ok((self.data.last_applied, self.data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for e in entries {
            self.data.last_applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => Response::Done,
                EntryPayload::Normal(cmd) => self.data.state.apply(&cmd),
                EntryPayload::Membership(m) => {
                    let configs = m
                        .get_joint_config()
                        .iter()
                        .map(|c| c.iter().copied().collect())
                        .collect();
                    self.data.state.membership_applied(e.log_id.index, configs);
                    self.data.last_membership = StoredMembership::new(Some(e.log_id), m);
                    Response::Done
                }
            });
        }
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            dir: self.dir.clone(),
            data: self.data.clone(),
            snapshot: self.snapshot.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let decoded: SmData = serde_json::from_slice(&bytes)
            .map_err(|e| snapshot_error(Some(meta), ErrorVerb::Read, &e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        // Durable before the state changes: openraft may purge the log up to
        // this snapshot as soon as we return.
        {
            let mut slot = lock(&self.snapshot).await;
            persist_durably(&self.dir, &stored)
                .await
                .map_err(|e| snapshot_error(Some(meta), ErrorVerb::Write, &e))?;
            *slot = Some(stored);
        }
        // The metadata is authoritative for position and membership; the data
        // carries the same values when a peer built it with this code.
        self.data = SmData {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            state: decoded.state,
        };
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(lock(&self.snapshot).await.clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
