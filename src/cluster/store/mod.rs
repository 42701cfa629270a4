//! Durable raft storage for the cluster log: the log store (vote, entries,
//! purge point, committed id) and the state machine with its snapshots.
//!
//! Both live in one directory (the node passes `data_dir/cluster`) under
//! distinct file names; every write that openraft relies on is fsynced
//! before it is acknowledged.

mod frame;
mod log;
#[cfg(test)]
pub(crate) mod raft_tests;
mod sm;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

pub use log::{LogReader, LogStore};
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
        frame::sync_dir(parent).map_err(|e| StoreError::io(parent, e))?;
    }
    Ok(())
}

/// Opens the log store and the state machine that share `dir`.
pub fn open(dir: impl AsRef<Path>) -> Result<(LogStore, StateMachine), StoreError> {
    let dir = dir.as_ref();
    Ok((LogStore::open(dir)?, StateMachine::open(dir)?))
}
