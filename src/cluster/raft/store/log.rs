//! The durable raft log store: vote, log entries, purge point, committed id.
//!
//! Layout under the store directory:
//! - `raft-log`: append-only frames (see `record`), each a JSON [`Record`]:
//!   an entry, or a truncate marker that drops every entry from an index on.
//!   Replaying the file in order rebuilds the log.
//! - `raft-meta`: one frame holding [`Meta`] (vote, purged log id, committed
//!   log id), replaced atomically on every change.
//!
//! All entries live in memory too (the cluster log is small and purged after
//! every snapshot), so reads never touch the disk. File I/O is plain blocking
//! I/O on the calling task: openraft requires log writes to be serialized
//! anyway, each write is a few hundred bytes, and one fsync per call is the
//! cost of durability.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, LogState, RaftLogId, RaftLogReader, StorageError, Vote,
};
use serde::{Deserialize, Serialize};

use super::record;
use super::StoreError;
use crate::cluster::state::{NodeId, TypeConfig};

const LOG_FILE: &str = "raft-log";
const META_FILE: &str = "raft-meta";

/// Compact the log file once this many records are dead and they outnumber
/// the live ones: rewriting costs O(live), so it is paid rarely.
const COMPACT_MIN_DEAD: usize = 1024;

/// One record of the log file, as read back.
#[derive(Deserialize)]
enum Record {
    Entry(Entry<TypeConfig>),
    Truncate { since: u64 },
}

/// The same records, borrowed for writing (identical JSON to [`Record`]).
#[derive(Serialize)]
#[serde(rename = "Record")]
enum RecordRef<'a> {
    Entry(&'a Entry<TypeConfig>),
    Truncate { since: u64 },
}

/// Small state that is rewritten whole on change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote<NodeId>>,
    purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

type Entries = BTreeMap<u64, Entry<TypeConfig>>;

/// The durable raft log store, opened on a directory.
pub struct LogStore {
    dir: PathBuf,
    file: File,
    meta: Meta,
    entries: Arc<RwLock<Entries>>,
    /// Records in the file that no longer back a live entry.
    dead: usize,
    /// Set after a failed append that could not be cut back: the file may
    /// end in a partial frame, and frames written after it would be lost
    /// on replay, so no more writes until the store is reopened (which
    /// drops the partial frame).
    failed: bool,
}

/// A cheap, cloneable reader of the log, for openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    entries: Arc<RwLock<Entries>>,
}

fn read(entries: &RwLock<Entries>) -> RwLockReadGuard<'_, Entries> {
    // A panic while holding the lock cannot leave the map half-updated (each
    // update is one map operation), so a poisoned lock is still usable.
    entries.read().unwrap_or_else(|e| e.into_inner())
}

fn write(entries: &RwLock<Entries>) -> RwLockWriteGuard<'_, Entries> {
    entries.write().unwrap_or_else(|e| e.into_inner())
}

fn get_range<RB: RangeBounds<u64>>(entries: &RwLock<Entries>, range: RB) -> Vec<Entry<TypeConfig>> {
    read(entries).range(range).map(|(_, e)| e.clone()).collect()
}

fn io_error(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: io::Error) -> StorageError<NodeId> {
    StorageError::from_io_error(subject, verb, e)
}

fn encode(buf: &mut Vec<u8>, rec: &RecordRef<'_>) {
    let json = serde_json::to_vec(rec).expect("log records always serialize");
    record::encode_into(buf, &json);
}

impl LogStore {
    /// Opens (creating if needed) the log store in `dir`, recovering the vote,
    /// purge point, committed id and every intact entry; a torn tail left by
    /// a crash mid-append is cut off.
    pub fn open(dir: impl AsRef<Path>) -> Result<LogStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        super::ensure_dir(&dir)?;
        let meta = read_meta(&dir)?;

        let path = dir.join(LOG_FILE);
        let bytes = record::read_optional(&dir, LOG_FILE).map_err(|e| StoreError::io(&path, e))?;
        let existed = bytes.is_some();
        let bytes = bytes.unwrap_or_default();
        let scan = record::scan(&bytes);
        let purged_index = meta.purged.map(|l| l.index);

        let mut entries = Entries::new();
        for payload in &scan.frames {
            // A frame with a good CRC that does not parse is not a torn
            // write: it is a bug or foreign data, and guessing would be worse.
            let rec: Record = serde_json::from_slice(payload)
                .map_err(|e| StoreError::corrupt(&path, format!("bad record: {e}")))?;
            match rec {
                Record::Entry(e) => {
                    let idx = e.get_log_id().index;
                    if let Some(&last) = entries.keys().next_back() {
                        // A gap is only legal where everything before it is
                        // purged anyway (a purge past the end of the log).
                        let gap_purged = purged_index.is_some_and(|p| idx <= p + 1);
                        if idx > last + 1 && !gap_purged {
                            let why = format!("entry {idx} follows {last}");
                            return Err(StoreError::corrupt(&path, why));
                        }
                    }
                    // As in raft, an entry at an index replaces that index
                    // and everything after it.
                    entries.split_off(&idx);
                    entries.insert(idx, e);
                }
                Record::Truncate { since } => {
                    entries.split_off(&since);
                }
            }
        }
        if let Some(p) = purged_index {
            entries = entries.split_off(&(p + 1));
        }

        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        if scan.valid_len < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = bytes.len() - scan.valid_len,
                "cluster log ends in a torn write; dropping it"
            );
            file.set_len(scan.valid_len as u64)
                .and_then(|_| file.sync_all())
                .map_err(|e| StoreError::io(&path, e))?;
        }
        if !existed {
            record::sync_dir(&dir).map_err(|e| StoreError::io(&dir, e))?;
        }
        let dead = scan.frames.len() - entries.len();
        Ok(LogStore {
            dir,
            file,
            meta,
            entries: Arc::new(RwLock::new(entries)),
            dead,
            failed: false,
        })
    }

    /// Appends framed records and makes them durable with one fsync,
    /// waiting for room on a full disk.
    async fn append_records(&mut self, buf: &[u8]) -> io::Result<()> {
        super::until_room("cluster log", || self.write_records(buf)).await
    }

    /// One attempt at `append_records`; a failed one is cut back off the
    /// file, so that another may follow it.
    fn write_records(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(
                "cluster log store failed earlier; reopen it",
            ));
        }
        let len = self.file.metadata()?.len();
        let res = self.file.write_all(buf).and_then(|_| self.file.sync_data());
        if res.is_err() {
            let cut = self.file.set_len(len).and_then(|_| self.file.sync_all());
            self.failed = cut.is_err();
        }
        res
    }

    /// `save_meta`, waiting for room on a full disk.
    async fn store_meta(&mut self, meta: Meta) -> io::Result<()> {
        super::until_room("cluster log meta", || self.save_meta(meta.clone())).await
    }

    /// Replaces the meta file, then the in-memory copy (only once durable).
    fn save_meta(&mut self, meta: Meta) -> io::Result<()> {
        let json = serde_json::to_vec(&meta).expect("meta always serializes");
        let mut buf = Vec::with_capacity(json.len() + record::HEADER);
        record::encode_into(&mut buf, &json);
        record::write_atomic(&self.dir, META_FILE, &buf)?;
        self.meta = meta;
        Ok(())
    }

    /// Rewrites the log file with only the live entries, when enough of it is
    /// dead (purged or truncated) to be worth it.
    fn maybe_compact(&mut self) -> io::Result<()> {
        let live = read(&self.entries).len();
        if self.dead >= COMPACT_MIN_DEAD && self.dead >= live {
            match self.compact() {
                // Not written, the old file in place: next time.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    tracing::warn!(error = %e, "cluster log not compacted: the disk is full");
                }
                other => other?,
            }
        }
        Ok(())
    }

    /// Rewrites the log file with only the live entries, atomically.
    pub(crate) fn compact(&mut self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(
                "cluster log store failed earlier; reopen it",
            ));
        }
        let mut buf = Vec::new();
        for e in read(&self.entries).values() {
            encode(&mut buf, &RecordRef::Entry(e));
        }
        // The purge point is already in the meta file, so dropping purged
        // entries from the log cannot resurrect anything after a crash.
        record::write_atomic(&self.dir, LOG_FILE, &buf)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_FILE))?;
        self.dead = 0;
        Ok(())
    }
}

fn read_meta(dir: &Path) -> Result<Meta, StoreError> {
    let path = dir.join(META_FILE);
    let Some(bytes) =
        record::read_optional(dir, META_FILE).map_err(|e| StoreError::io(&path, e))?
    else {
        return Ok(Meta::default());
    };
    // Written atomically, so anything but one intact frame is real damage.
    let scan = record::scan(&bytes);
    if scan.frames.len() != 1 || scan.valid_len != bytes.len() {
        return Err(StoreError::corrupt(&path, "not one intact frame".into()));
    }
    serde_json::from_slice(scan.frames[0]).map_err(|e| StoreError::corrupt(&path, e.to_string()))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        Ok(get_range(&self.entries, range))
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        Ok(get_range(&self.entries, range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last = read(&self.entries)
            .values()
            .next_back()
            .map(|e| *e.get_log_id());
        Ok(LogState {
            last_purged_log_id: self.meta.purged,
            last_log_id: last.or(self.meta.purged),
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            entries: self.entries.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let meta = Meta {
            vote: Some(*vote),
            ..self.meta.clone()
        };
        self.store_meta(meta)
            .await
            .map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.meta.vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        if committed == self.meta.committed {
            return Ok(());
        }
        let meta = Meta {
            committed,
            ..self.meta.clone()
        };
        self.store_meta(meta)
            .await
            .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.meta.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        // Everything openraft hands over in one call goes out in one write
        // and one fsync.
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let mut buf = Vec::new();
        for e in &entries {
            encode(&mut buf, &RecordRef::Entry(e));
        }
        if let Err(e) = self.append_records(&buf).await {
            callback.log_io_completed(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(io_error(ErrorSubject::Logs, ErrorVerb::Write, e));
        }
        {
            let mut map = write(&self.entries);
            for e in entries {
                // openraft truncates before it overwrites, but if it ever
                // did not, replay (which does the same) must agree with us.
                let idx = e.get_log_id().index;
                self.dead += map.split_off(&idx).len();
                map.insert(idx, e);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let since = log_id.index;
        let mut buf = Vec::new();
        encode(&mut buf, &RecordRef::Truncate { since });
        self.append_records(&buf)
            .await
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        let removed = write(&self.entries).split_off(&since).len();
        self.dead += removed + 1;
        self.maybe_compact()
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        if self.meta.purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        // Durable purge point first: replay drops everything up to it, so the
        // file itself may keep the old records until compaction.
        let meta = Meta {
            purged: Some(log_id),
            ..self.meta.clone()
        };
        self.store_meta(meta)
            .await
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        let removed = {
            let mut map = write(&self.entries);
            let keep = map.split_off(&(log_id.index + 1));
            std::mem::replace(&mut *map, keep).len()
        };
        self.dead += removed;
        self.maybe_compact()
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Write, e))
    }
}
