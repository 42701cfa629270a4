//! Admission per client address: how many sessions one address has open,
//! and how many it opened in the current minute. IPv6 clients are counted
//! per /64, which one subscriber usually has whole. Memory is bounded:
//! past MAX_TRACKED addresses, idle ones are forgotten first, and if
//! every one is busy the rate goes unchecked (the global connection limit
//! still holds).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::budget::Budget;
use crate::config::ClientLimits;

/// Most addresses tracked at once.
const MAX_TRACKED: usize = 100_000;
/// The window of the connection rate.
const WINDOW: Duration = Duration::from_secs(60);

/// Why a client was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooMany {
    /// Too many sessions open from its address.
    Open,
    /// Too many new sessions from its address this minute.
    Rate,
}

#[derive(Debug)]
struct Entry {
    open: usize,
    window_start: Instant,
    started: usize,
    messages: usize,
    recipients: usize,
    auth_failures: usize,
    /// Bytes of message bodies its sessions hold now.
    memory: u64,
}

impl Entry {
    /// Start a new minute if this one is over.
    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.started = 0;
            self.messages = 0;
            self.recipients = 0;
            self.auth_failures = 0;
        }
    }
}

/// Unsuccessful AUTH attempts per minute from one address before it must
/// wait.
pub const AUTH_FAILURES: usize = 5;

/// Sessions by client address, and the memory all sessions' message
/// bodies hold.
#[derive(Debug, Default)]
pub struct Clients {
    /// Shared by every session of the node, trusted clients' too.
    pub memory: Arc<super::memory::BodyMemory>,
    map: Mutex<HashMap<IpAddr, Entry>>,
    /// When idle entries were last forgotten (at most once a window: it
    /// walks the whole table).
    pruned: Mutex<Option<Instant>>,
    /// The addresses of this node's cluster members (see
    /// [`super::session::Session::for_cluster_member`]).
    members: std::sync::RwLock<Vec<IpAddr>>,
}

/// Where clients are counted when the table is full: all together, under
/// the same limits — never unlimited.
const OVERFLOW: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

/// A session counted against its address while it lives.
#[derive(Debug)]
pub struct ClientSlot {
    clients: Arc<Clients>,
    key: IpAddr,
    limits: ClientLimits,
}

impl ClientSlot {
    fn take(&self, what: fn(&mut Entry) -> &mut usize, max: usize) -> bool {
        let mut map = self.clients.lock();
        let Some(e) = map.get_mut(&self.key) else {
            return true;
        };
        e.roll(Instant::now());
        let n = what(e);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }
}

impl Budget for ClientSlot {
    fn message(&self) -> bool {
        self.take(|e| &mut e.messages, self.limits.messages_per_client)
    }

    fn recipient(&self) -> bool {
        self.take(|e| &mut e.recipients, self.limits.recipients_per_client)
    }

    fn auth_attempt(&self) -> bool {
        self.take(|e| &mut e.auth_failures, AUTH_FAILURES)
    }

    fn auth_succeeded(&self) {
        let mut map = self.clients.lock();
        if let Some(e) = map.get_mut(&self.key) {
            e.auth_failures = e.auth_failures.saturating_sub(1);
        }
    }

    fn take_memory(&self, n: u64, share: u64) -> bool {
        let mut map = self.clients.lock();
        let Some(e) = map.get_mut(&self.key) else {
            return true;
        };
        match e.memory.checked_add(n) {
            Some(after) if after <= share => {
                e.memory = after;
                true
            }
            _ => false,
        }
    }

    fn give_memory(&self, n: u64) {
        let mut map = self.clients.lock();
        if let Some(e) = map.get_mut(&self.key) {
            e.memory = e.memory.saturating_sub(n);
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.clients.lock();
        if let Some(e) = map.get_mut(&self.key) {
            e.open = e.open.saturating_sub(1);
        }
    }
}

/// The address a client is counted under.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

impl Clients {
    /// The cluster's members are now at `addrs`.
    pub fn set_members(&self, addrs: Vec<IpAddr>) {
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = addrs;
    }

    /// Whether `ip` is a cluster member's address.
    pub fn is_member(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&ip)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admit a session from `ip` at `now`, or say why not.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &ClientLimits,
        now: Instant,
    ) -> Result<ClientSlot, TooMany> {
        let mut key = key(ip);
        let mut map = self.lock();
        if map.len() >= MAX_TRACKED && !map.contains_key(&key) {
            let mut pruned = self.pruned.lock().unwrap_or_else(|e| e.into_inner());
            if pruned.is_none_or(|at| now.duration_since(at) >= WINDOW) {
                *pruned = Some(now);
                map.retain(|_, e| e.open > 0 || now.duration_since(e.window_start) < WINDOW);
            }
            if map.len() >= MAX_TRACKED {
                key = OVERFLOW;
            }
        }
        let e = map.entry(key).or_insert(Entry {
            open: 0,
            window_start: now,
            started: 0,
            messages: 0,
            recipients: 0,
            auth_failures: 0,
            memory: 0,
        });
        e.roll(now);
        if e.open >= limits.connections_per_client {
            return Err(TooMany::Open);
        }
        if e.started >= limits.connection_rate_per_client {
            return Err(TooMany::Rate);
        }
        e.open += 1;
        e.started += 1;
        Ok(ClientSlot {
            clients: self.clone(),
            key,
            limits: limits.clone(),
        })
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(open: usize, rate: usize) -> ClientLimits {
        ClientLimits {
            connections_per_client: open,
            connection_rate_per_client: rate,
            ..ClientLimits::default()
        }
    }

    #[test]
    fn open_sessions_per_address_are_capped_and_freed_on_drop() {
        let c = Arc::new(Clients::default());
        let (l, now) = (limits(2, 100), Instant::now());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let a = c.admit(ip, &l, now).unwrap();
        let _b = c.admit(ip, &l, now).unwrap();
        assert_eq!(c.admit(ip, &l, now).unwrap_err(), TooMany::Open);
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert!(
            c.admit(other, &l, now).is_ok(),
            "another address is not affected"
        );
        drop(a);
        assert!(c.admit(ip, &l, now).is_ok());
    }

    #[test]
    fn an_addresss_sessions_share_one_memory_share() {
        let c = Arc::new(Clients::default());
        let (l, now) = (limits(5, 100), Instant::now());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let (a, b) = (c.admit(ip, &l, now).unwrap(), c.admit(ip, &l, now).unwrap());
        assert!(a.take_memory(600, 1000));
        assert!(!b.take_memory(401, 1000));
        assert!(b.take_memory(400, 1000));
        let other = c.admit("192.0.2.8".parse().unwrap(), &l, now).unwrap();
        assert!(other.take_memory(1000, 1000), "another address has its own");
        a.give_memory(600);
        assert!(b.take_memory(600, 1000));
    }

    #[test]
    fn new_sessions_per_minute_are_capped_then_allowed_again() {
        let c = Arc::new(Clients::default());
        let (l, t0) = (limits(100, 3), Instant::now());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..3 {
            drop(c.admit(ip, &l, t0).unwrap());
        }
        assert_eq!(
            c.admit(ip, &l, t0 + Duration::from_secs(59)).unwrap_err(),
            TooMany::Rate
        );
        assert!(c.admit(ip, &l, t0 + WINDOW).is_ok(), "a new minute");
    }

    #[test]
    fn messages_and_recipients_per_minute_are_shared_by_an_address() {
        let c = Arc::new(Clients::default());
        let l = ClientLimits {
            messages_per_client: 2,
            recipients_per_client: 3,
            ..ClientLimits::default()
        };
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let (a, b) = (
            c.admit(ip, &l, Instant::now()).unwrap(),
            c.admit(ip, &l, Instant::now()).unwrap(),
        );
        assert!(a.message() && b.message());
        assert!(!a.message(), "two sessions share the address's budget");
        assert!(a.recipient() && a.recipient() && b.recipient());
        assert!(!b.recipient());
    }

    #[test]
    fn ipv6_clients_count_per_slash_64() {
        let c = Arc::new(Clients::default());
        let (l, now) = (limits(1, 100), Instant::now());
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _s = c.admit(a, &l, now).unwrap();
        assert_eq!(c.admit(b, &l, now).unwrap_err(), TooMany::Open, "same /64");
        assert!(c.admit(other, &l, now).is_ok());
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let _m = c.admit(mapped, &l, now).unwrap();
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            c.admit(v4, &l, now).unwrap_err(),
            TooMany::Open,
            "mapped is v4"
        );
    }

    #[test]
    fn idle_addresses_are_forgotten_when_the_table_is_full() {
        let c = Arc::new(Clients::default());
        let (l, t0) = (limits(10, 10), Instant::now());
        for i in 0..MAX_TRACKED as u32 {
            drop(c.admit(IpAddr::V4(i.into()), &l, t0).unwrap());
        }
        assert_eq!(c.tracked(), MAX_TRACKED);
        let later = t0 + WINDOW;
        let ip: IpAddr = "203.0.113.1".parse().unwrap();
        let _s = c.admit(ip, &l, later).unwrap();
        assert_eq!(c.tracked(), 1, "the idle ones went");
    }

    #[test]
    fn when_every_entry_is_busy_newcomers_share_one_limited_bucket() {
        let c = Arc::new(Clients::default());
        let (l, t0) = (limits(1, 10), Instant::now());
        let held: Vec<_> = (0..MAX_TRACKED as u32)
            .map(|i| c.admit(IpAddr::V4(i.into()), &l, t0).unwrap())
            .collect();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let _s = c.admit(a, &l, t0).unwrap();
        assert_eq!(
            c.admit(b, &l, t0).unwrap_err(),
            TooMany::Open,
            "one bucket, limited"
        );
        drop(held);
    }

    #[test]
    fn auth_attempts_count_when_they_start_and_successes_are_refunded() {
        let c = Arc::new(Clients::default());
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let s = c
            .admit(ip, &ClientLimits::default(), Instant::now())
            .unwrap();
        for _ in 0..AUTH_FAILURES {
            assert!(s.auth_attempt());
        }
        assert!(!s.auth_attempt(), "running attempts count too");
        s.auth_succeeded();
        assert!(s.auth_attempt());
    }
}
