//! The data directory's lock: one `mtad` per data directory. Two daemons
//! on one spool and one raft log would each believe it alone writes them;
//! the second is refused at start, naming the first's process id.
//!
//! An advisory `flock` on `DATA_DIR/mtad.lock`, held for the life of the
//! process: the kernel releases it however the process ends (kill -9
//! included), so a stale file never keeps a node from starting.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("the data directory {} is in use by another mtad (pid {pid}); two daemons must not share one", dir.display())]
    Held {
        /// The directory.
        dir: PathBuf,
        /// The holder's process id, as it wrote it ("?" if unreadable).
        pid: String,
    },
    /// The directory or the lock file could not be made or opened.
    #[error("cannot lock the data directory {}: {source}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Lock `dir` (made if missing) for this process, or say who holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("mtad.lock"))
            .map_err(io)?;
        // SAFETY: flock on a descriptor this function owns.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(e));
            }
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = match pid.trim() {
                "" => "?".to_string(),
                p => p.to_string(),
            };
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                pid,
            });
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        let first = DataDirLock::acquire(&data).unwrap();
        // Another open file description conflicts even in one process, as
        // another process's would.
        let err = DataDirLock::acquire(&data).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{text}");
        assert!(text.contains(&std::process::id().to_string()), "{text}");
        assert!(text.contains("in use by another mtad"), "{text}");
        drop(first);
        DataDirLock::acquire(&data).unwrap();
    }
}
