//! An in-memory network for cluster tests and the simulation.
//!
//! Nodes are IP addresses; a connection is two in-memory pipes with a pump
//! task per direction between them. The test can delay traffic, partition
//! nodes, cut a node's connections, or crash it:
//! - a partition holds bytes in flight (TCP retransmits) and makes new
//!   connects wait (a lost SYN) until it heals or the caller gives up;
//! - a cut resets every connection of a node, as a dropped link does;
//! - a crash cuts too, and the node's listeners vanish, so connects are
//!   refused until it listens again.
//!
//! Like TCP it never reorders bytes within a connection; messages reorder
//! across connections through their independent random delays, which come
//! from a seeded generator so a schedule can be replayed.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::transport::{Listener, Stream, Transport};
use futures_util::future::BoxFuture;

/// Bytes a pipe buffers before its writer waits.
const PIPE: usize = 64 * 1024;

/// The network; clones share it.
#[derive(Clone)]
pub struct MemNet {
    shared: Arc<Shared>,
}

struct Shared {
    net: Mutex<Net>,
    /// Bumped on every partition change, so held traffic re-checks.
    changed: watch::Sender<u64>,
}

type Incoming = mpsc::UnboundedSender<(Stream, SocketAddr)>;

struct Net {
    listeners: HashMap<SocketAddr, (u64, Incoming)>,
    /// Directions (from, to) that drop everything.
    blocked: HashSet<(IpAddr, IpAddr)>,
    conns: Vec<(IpAddr, IpAddr, CancellationToken)>,
    delay: (Duration, Duration),
    rng: u64,
    /// Listener ids and ephemeral ports.
    counter: u64,
}

impl Net {
    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// splitmix64: small, seedable, good enough for delays.
    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn delay(&mut self) -> Duration {
        let (lo, hi) = self.delay;
        let span = hi.saturating_sub(lo).as_nanos() as u64;
        if span == 0 {
            return lo;
        }
        lo + Duration::from_nanos(self.random() % (span + 1))
    }

    fn reset(&mut self, ip: IpAddr) {
        self.conns.retain(|(a, b, kill)| {
            let hit = *a == ip || *b == ip;
            if hit {
                kill.cancel();
            }
            !hit && !kill.is_cancelled()
        });
    }
}

impl MemNet {
    /// A network whose random delays come from `seed`; no delay until
    /// [`MemNet::set_delay`].
    pub fn new(seed: u64) -> MemNet {
        MemNet {
            shared: Arc::new(Shared {
                net: Mutex::new(Net {
                    listeners: HashMap::new(),
                    blocked: HashSet::new(),
                    conns: Vec::new(),
                    delay: (Duration::ZERO, Duration::ZERO),
                    rng: seed,
                    counter: 0,
                }),
                changed: watch::channel(0).0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        self.shared.net.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.shared.changed.send_modify(|g| *g += 1);
    }

    /// The transport for the node at `ip`.
    pub fn transport(&self, ip: IpAddr) -> Arc<dyn Transport> {
        Arc::new(MemTransport {
            net: self.clone(),
            ip,
        })
    }

    /// Every chunk of every connection is delayed by a random time in
    /// `[min, max]` (chunks of one connection stay in order).
    pub fn set_delay(&self, min: Duration, max: Duration) {
        self.lock().delay = (min, max.max(min));
    }

    /// Nothing crosses between a node in `a` and one in `b`, either way.
    pub fn split(&self, a: &[IpAddr], b: &[IpAddr]) {
        let mut net = self.lock();
        for &x in a {
            for &y in b {
                net.blocked.insert((x, y));
                net.blocked.insert((y, x));
            }
        }
        drop(net);
        self.bump();
    }

    /// Traffic from `from` to `to` is dropped (the other way still flows).
    pub fn block(&self, from: IpAddr, to: IpAddr) {
        self.lock().blocked.insert((from, to));
        self.bump();
    }

    /// Every partition ends; held traffic flows again.
    pub fn heal(&self) {
        self.lock().blocked.clear();
        self.bump();
    }

    /// Resets every connection of `ip`.
    pub fn cut(&self, ip: IpAddr) {
        self.lock().reset(ip);
    }

    /// Resets every connection of `ip` and removes its listeners.
    pub fn crash(&self, ip: IpAddr) {
        let mut net = self.lock();
        net.reset(ip);
        net.listeners.retain(|addr, _| addr.ip() != ip);
    }

    /// Connections open now (for tests that check links are dropped).
    pub fn open_connections(&self) -> usize {
        let mut net = self.lock();
        net.conns.retain(|(_, _, kill)| !kill.is_cancelled());
        net.conns.len()
    }

    fn blocked(&self, from: IpAddr, to: IpAddr) -> bool {
        self.lock().blocked.contains(&(from, to))
    }

    /// Waits until `from → to` is open; false if `kill` fires first.
    async fn open(&self, from: IpAddr, to: IpAddr, kill: &CancellationToken) -> bool {
        loop {
            // Subscribe before looking, so a heal in between is not missed.
            let mut changed = self.shared.changed.subscribe();
            if !self.blocked(from, to) {
                return true;
            }
            tokio::select! {
                _ = kill.cancelled() => return false,
                _ = changed.changed() => {}
            }
        }
    }

    fn connect(&self, from: IpAddr, to: SocketAddr) -> io::Result<Stream> {
        let mut net = self.lock();
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let incoming = net.listeners.get(&to).ok_or_else(refused)?.1.clone();
        let port = 10_000 + (net.next() % 50_000) as u16;
        let (client, client_net) = tokio::io::duplex(PIPE);
        let (server, server_net) = tokio::io::duplex(PIPE);
        incoming
            .send((Box::new(server), SocketAddr::new(from, port)))
            .map_err(|_| refused())?;
        let kill = CancellationToken::new();
        net.conns.retain(|(_, _, k)| !k.is_cancelled());
        net.conns.push((from, to.ip(), kill.clone()));
        drop(net);
        let (c_rd, c_wr) = tokio::io::split(client_net);
        let (s_rd, s_wr) = tokio::io::split(server_net);
        let ended = Arc::new(AtomicU8::new(0));
        let pump = Pump {
            net: self.clone(),
            kill,
            ended,
        };
        tokio::spawn(pump.clone().run(from, to.ip(), c_rd, s_wr));
        tokio::spawn(pump.run(to.ip(), from, s_rd, c_wr));
        Ok(Box::new(client))
    }
}

/// Moves one direction of a connection.
#[derive(Clone)]
struct Pump {
    net: MemNet,
    kill: CancellationToken,
    /// Directions that saw an orderly end; at two the connection is gone.
    ended: Arc<AtomicU8>,
}

impl Pump {
    async fn run(
        self,
        from: IpAddr,
        to: IpAddr,
        mut rd: ReadHalf<DuplexStream>,
        mut wr: WriteHalf<DuplexStream>,
    ) {
        let mut buf = vec![0u8; PIPE];
        let mut last = Instant::now();
        loop {
            let n = tokio::select! {
                _ = self.kill.cancelled() => return,
                r = rd.read(&mut buf) => r,
            };
            let n = match n {
                Ok(0) => {
                    // Half-close: the other direction may still talk.
                    let _ = wr.shutdown().await;
                    if self.ended.fetch_add(1, Ordering::SeqCst) == 1 {
                        self.kill.cancel();
                    }
                    return;
                }
                Ok(n) => n,
                Err(_) => break,
            };
            let at = last.max(Instant::now() + self.net.lock().delay());
            last = at;
            tokio::select! {
                _ = self.kill.cancelled() => return,
                _ = sleep_until(at) => {}
            }
            // Held while the path is cut, as TCP retransmits, and delivered
            // after the heal unless the connection is dropped first.
            if !self.net.open(from, to, &self.kill).await {
                return;
            }
            let written = tokio::select! {
                _ = self.kill.cancelled() => return,
                r = wr.write_all(&buf[..n]) => r,
            };
            if written.is_err() {
                break;
            }
        }
        // An error on either end resets the whole connection.
        self.kill.cancel();
    }
}

#[derive(Clone)]
struct MemTransport {
    net: MemNet,
    ip: IpAddr,
}

impl std::fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemTransport({})", self.ip)
    }
}

impl Transport for MemTransport {
    fn connect(&self, to: SocketAddr) -> BoxFuture<'_, io::Result<Stream>> {
        Box::pin(async move {
            let never = CancellationToken::new();
            // A lost SYN or SYN-ACK: wait; the caller's deadline decides.
            loop {
                self.net.open(self.ip, to.ip(), &never).await;
                if !self.net.blocked(to.ip(), self.ip) {
                    break;
                }
                self.net.open(to.ip(), self.ip, &never).await;
            }
            self.net.connect(self.ip, to)
        })
    }

    fn listen(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            if addr.ip() != self.ip {
                return Err(io::Error::from(io::ErrorKind::AddrNotAvailable));
            }
            let mut net = self.net.lock();
            let addr = match addr.port() {
                0 => SocketAddr::new(addr.ip(), 10_000 + (net.next() % 50_000) as u16),
                _ => addr,
            };
            if net.listeners.contains_key(&addr) {
                return Err(io::Error::from(io::ErrorKind::AddrInUse));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let id = net.next();
            net.listeners.insert(addr, (id, tx));
            Ok(Box::new(MemListener {
                net: self.net.clone(),
                addr,
                id,
                rx,
            }) as Box<dyn Listener>)
        })
    }
}

struct MemListener {
    net: MemNet,
    addr: SocketAddr,
    id: u64,
    rx: mpsc::UnboundedReceiver<(Stream, SocketAddr)>,
}

impl Listener for MemListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(Stream, SocketAddr)>> {
        Box::pin(async move {
            match self.rx.recv().await {
                Some(c) => Ok(c),
                // Crashed: nothing will ever arrive; the owner's shutdown
                // ends its accept loop.
                None => std::future::pending().await,
            }
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

impl Drop for MemListener {
    fn drop(&mut self) {
        let mut net = self.net.lock();
        if net
            .listeners
            .get(&self.addr)
            .is_some_and(|(id, _)| *id == self.id)
        {
            net.listeners.remove(&self.addr);
        }
    }
}

#[cfg(test)]
#[path = "memnet_tests.rs"]
mod tests;
