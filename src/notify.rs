//! The systemd notification protocol (sd_notify): datagrams such as
//! `READY=1` to the socket named by `NOTIFY_SOCKET`, so a `Type=notify`
//! (or `notify-reload`) unit knows when the node serves, reloads, stops,
//! and is still alive (`WATCHDOG=1` within `WatchdogSec`). Without
//! `NOTIFY_SOCKET` every call does nothing.

use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where notifications go, if anywhere.
#[derive(Clone)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Clone)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|v| {
            let v = v.into_encoded_bytes();
            match v.split_first() {
                Some((b'@', name)) => Some(Target::Abstract(name.to_vec())),
                Some((b'/', _)) => {
                    Some(Target::Path(PathBuf::from(std::ffi::OsString::from_vec(v))))
                }
                _ => None,
            }
        });
        Notifier { target }
    }

    /// Send `state` (newline-separated assignments); failures are logged,
    /// never fatal: the service runs on without its supervisor's notice.
    pub fn send(&self, state: &str) {
        let Some(target) = &self.target else {
            return;
        };
        let sent = UnixDatagram::unbound().and_then(|s| match target {
            Target::Path(p) => s.send_to(state.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                s.send_to_addr(state.as_bytes(), &addr)
            }
        });
        if let Err(e) = sent {
            tracing::warn!(error = %e, state, "cannot notify the service manager");
        }
    }

    /// The node serves: listeners bound, spool open, queue recovered.
    pub fn ready(&self) {
        self.send("READY=1\nSTATUS=serving");
    }

    /// A reload starts (finish it with [`Notifier::ready`]).
    pub fn reloading(&self) {
        let usec = monotonic_usec();
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading"
        ));
    }

    /// The node is stopping.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// Still alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// How often the manager wants `WATCHDOG=1`: `WATCHDOG_USEC`, when
    /// `WATCHDOG_PID` is unset or this process.
    pub fn watchdog_interval() -> Option<Duration> {
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec))
    }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
