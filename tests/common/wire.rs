//! The outside observer of VIP ownership: every ARP frame that enters the
//! lab's switch claiming the VIP (an answer from it, or a gratuitous ARP
//! announcing it), with the kernel's receive timestamp, and the check that
//! no two MACs answered for it at the same time.
//!
//! It reads what hosts put on the wire, never what a daemon believes. A
//! prober (`who_has` in a loop on a client) keeps asking, so that every
//! host whose kernel holds the address answers again and again.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::netns::{mac_text, Lab};

/// One frame claiming the VIP, as it entered the switch.
#[derive(Debug, Clone, Copy)]
pub struct Claim {
    /// Kernel receive time, since the Unix epoch.
    pub at: Duration,
    /// The sender's MAC.
    pub mac: [u8; 6],
    /// An unasked announcement (gratuitous ARP) rather than an answer.
    pub announced: bool,
}

/// Frames of one MAC this close together belong to one stretch of
/// answering (the prober asks every ~20 ms; a failover takes far longer).
pub const STRETCH_GAP: Duration = Duration::from_millis(300);

/// How far an old owner's frame may come after its successor's first
/// frame and still be its last reply already on the way: the measurement's
/// tolerance, one probe round.
pub const TOLERANCE: Duration = Duration::from_millis(20);

/// Record every ARP frame claiming `vip` that enters the lab's switch,
/// until `stop`. Runs on a thread inside the switch namespace.
pub fn record(
    lab: &Lab,
    vip: Ipv4Addr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Claim>> {
    lab.within("sw", move || capture(vip, &stop))
}

fn capture(vip: Ipv4Addr, stop: &AtomicBool) -> Vec<Claim> {
    // Every protocol: a bridge port hands frames to the bridge before
    // protocol-specific sockets could see them; only "all" taps come first.
    const ETH_P_ALL: u16 = 0x0003;
    let mut claims = Vec::new();
    // SAFETY: plain socket calls with checked results and buffers that
    // outlive each call.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ALL.to_be()),
        );
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let br = std::ffi::CString::new("br0").unwrap();
        let bridge = libc::if_nametoindex(br.as_ptr()) as i32;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let mut buf = [0u8; 128];
        while !stop.load(Ordering::SeqCst) {
            let mut from: libc::sockaddr_ll = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            );
            // Each frame once: as it arrives on the port of the host that
            // sent it — not as the bridge forwards it out of the other
            // ports, nor its copy to the bridge device itself.
            if n < 42
                || from.sll_pkttype == libc::PACKET_OUTGOING
                || from.sll_ifindex == bridge
                || buf[12..14] != [0x08, 0x06]
                || buf[28..32] != vip.octets()
            {
                continue;
            }
            let mut stamp: libc::timeval = std::mem::zeroed();
            // SIOCGSTAMP: the kernel's receive time of that frame.
            libc::ioctl(fd, 0x8906, &mut stamp);
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&buf[22..28]);
            let request = buf[20..22] == [0, 1];
            claims.push(Claim {
                at: Duration::new(stamp.tv_sec as u64, stamp.tv_usec as u32 * 1000),
                mac,
                announced: request && buf[38..42] == vip.octets(),
            });
        }
        libc::close(fd);
    }
    claims
}

/// A time two MACs answered for the VIP at once.
#[derive(Debug, Clone)]
pub struct Double {
    /// The MAC that began answering second.
    pub late: String,
    /// The MAC that was answering already.
    pub owner: String,
    /// How long both answered.
    pub into: Duration,
}

/// Each MAC's stretches of answering, in the order they began: (MAC,
/// first frame, last frame).
pub fn stretches(claims: &[Claim]) -> Vec<([u8; 6], Duration, Duration)> {
    let mut by_mac: BTreeMap<[u8; 6], Vec<(Duration, Duration)>> = BTreeMap::new();
    for c in claims {
        let s = by_mac.entry(c.mac).or_default();
        match s.last_mut() {
            Some((_, end)) if c.at.saturating_sub(*end) <= STRETCH_GAP => *end = c.at.max(*end),
            _ => s.push((c.at, c.at)),
        }
    }
    let mut all: Vec<_> = by_mac
        .iter()
        .flat_map(|(mac, s)| s.iter().map(|(a, b)| (*mac, *a, *b)))
        .collect();
    all.sort_by_key(|(_, a, _)| *a);
    all
}

/// Every time a MAC began answering while another still answered, by
/// more than `TOLERANCE`.
pub fn doubles(claims: &[Claim]) -> Vec<Double> {
    let all = stretches(claims);
    let mut out = Vec::new();
    for (old, a0, a1) in &all {
        for (new, b0, b1) in &all {
            let both = (*a1).min(*b1).saturating_sub(*b0);
            if old != new && b0 >= a0 && both > TOLERANCE {
                out.push(Double {
                    late: mac_text(new),
                    owner: mac_text(old),
                    into: both,
                });
            }
        }
    }
    out
}

/// The stretches for a report, one line each.
pub fn report(claims: &[Claim]) -> Vec<String> {
    stretches(claims)
        .iter()
        .map(|(mac, a, b)| {
            let n = claims
                .iter()
                .filter(|c| c.mac == *mac && c.at >= *a && c.at <= *b)
                .count();
            format!(
                "{} {:.3}..{:.3} ({n} frames)",
                mac_text(mac),
                a.as_secs_f64(),
                b.as_secs_f64()
            )
        })
        .collect()
}

/// Keep asking who has `vip` from `me` on a client host, until `stop`,
/// counting the rounds in `rounds`.
pub fn probe(
    lab: &Lab,
    host: &str,
    (me, vip): (Ipv4Addr, Ipv4Addr),
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    lab.within(host, move || {
        while !stop.load(Ordering::SeqCst) {
            super::netns::who_has(me, vip, Duration::from_millis(20));
            rounds.fetch_add(1, Ordering::SeqCst);
        }
    })
}
