//! Notifications to systemd (sd_notify, via the sd-notify crate), so a
//! `Type=notify` unit knows when the node serves, reloads, stops, and is
//! still alive (`WATCHDOG=1` within `WatchdogSec`). Without
//! `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// Failures are logged, never fatal: the service runs on without its
/// supervisor's notice.
fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// The node serves: listeners bound, spool open, queue recovered.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// A reload starts (finish it with [`ready`]).
pub fn reloading() {
    let mut state = vec![NotifyState::Reloading];
    // systemd ≥ 253 wants the time with it (Type=notify-reload).
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        state.push(now);
    }
    state.push(NotifyState::Status("reloading"));
    send(&state);
}

/// The node is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Still alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often the manager wants `WATCHDOG=1`, if at all.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}
