//! Durable raft storage for the cluster log: the log store (vote, entries,
//! purge point, committed id) and the state machine with its snapshots.
//!
//! Both live in one directory (the node passes `data_dir/cluster`) under
//! distinct file names; every write that openraft relies on is fsynced
//! before it is acknowledged.
//!
//! A write that finds the disk full waits for room (see [`until_room`])
//! rather than fail: openraft stops for good at the first storage error,
//! and a node must not need a restart because another file filled its
//! disk for a while. Meanwhile this node's raft is stalled, as if paused.

mod log;
#[cfg(test)]
pub(crate) mod raft_tests;
mod record;
mod sm;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

pub use log::{LogReader, LogStore};

/// How long a write waits for the disk to have room before it fails.
const OUT_OF_SPACE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(300);

/// Run `write` until it succeeds, trying again (from 100 ms, doubling to
/// 2 s) while it fails for want of space (ENOSPC, EDQUOT), for at most
/// [`OUT_OF_SPACE_PATIENCE`]; any other error at once. `write` must leave
/// things as they were when it fails (cut a partial append back).
pub(crate) async fn until_room<T>(
    what: &str,
    mut write: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let started = crate::clock::instant();
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match write() {
            Err(e) if out_of_space(&e) && started.elapsed() < OUT_OF_SPACE_PATIENCE => {
                if pause.as_millis() == 100 {
                    tracing::error!(%what, error = %e, "the disk is full: cluster writes wait for room");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            done => return done,
        }
    }
}

fn out_of_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}
pub use sm::{ClusterView, SnapshotBuilder, StateMachine};

/// Why the cluster store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory could not be read or written.
    #[error("cluster store {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file holds intact frames that do not make sense: a bug or foreign
    /// data, not a crash (torn writes are detected and dropped).
    #[error("cluster store {}: corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl StoreError {
    fn io(path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn corrupt(path: &Path, reason: String) -> StoreError {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            reason,
        }
    }
}

/// Creates the store directory, making its creation durable so that files
/// fsynced inside it cannot vanish with it after a crash.
fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        record::sync_dir(parent).map_err(|e| StoreError::io(parent, e))?;
    }
    Ok(())
}

/// Opens the log store and the state machine that share `dir`.
pub fn open(dir: impl AsRef<Path>) -> Result<(LogStore, StateMachine), StoreError> {
    let dir = dir.as_ref();
    Ok((LogStore::open(dir)?, StateMachine::open(dir)?))
}
