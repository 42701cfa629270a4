//! The one place mtad reads the wall clock and std's monotonic clock
//! (`clippy.toml` bans them elsewhere), so every place time enters the
//! program can be found. Timers, deadlines and leases use
//! `tokio::time::Instant`, which tests can pause; this module is for
//! what must be real: timestamps people read, ids made from the time,
//! and durations measured for metrics.

#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock time since the Unix epoch (zero if the clock is before it).
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Wall-clock milliseconds since the Unix epoch, for records and logs.
pub fn now_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// The monotonic clock of the machine, not tokio's (which tests pause):
/// for durations that measure real work, such as an fsync.
pub fn instant() -> Instant {
    Instant::now()
}
