//! Counts every `fsync`/`fdatasync` made by this process.
//!
//! Both engines reach the kernel through libc's `fsync`/`fdatasync` (Rust's
//! `File::sync_all`/`sync_data` on Linux). Defining those symbols in the
//! executable overrides libc's for every caller in the process; each one
//! counts and then makes the real system call, so behaviour is unchanged.

use std::sync::atomic::{AtomicU64, Ordering};

static FSYNC: AtomicU64 = AtomicU64::new(0);
static FDATASYNC: AtomicU64 = AtomicU64::new(0);

/// Sync calls so far (fsync + fdatasync).
pub fn total() -> u64 {
    FSYNC.load(Ordering::Relaxed) + FDATASYNC.load(Ordering::Relaxed)
}

#[no_mangle]
pub extern "C" fn fsync(fd: libc::c_int) -> libc::c_int {
    FSYNC.fetch_add(1, Ordering::Relaxed);
    // SAFETY: a plain system call on a caller-supplied descriptor, exactly
    // what libc's wrapper does; errors come back as -1 with errno set.
    unsafe { libc::syscall(libc::SYS_fsync, fd) as libc::c_int }
}

#[no_mangle]
pub extern "C" fn fdatasync(fd: libc::c_int) -> libc::c_int {
    FDATASYNC.fetch_add(1, Ordering::Relaxed);
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_fdatasync, fd) as libc::c_int }
}
