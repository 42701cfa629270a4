//! Claiming an address: before a new owner adds the VIP, it makes sure no
//! other host still holds it — a former owner frozen with the address on
//! its interface keeps answering for it until the kernel's lifetime for it
//! runs out.
//!
//! - IPv4: RFC 5227 address conflict detection, on a faster schedule (a
//!   LAN answers within a millisecond): ARP requests for the address from
//!   0.0.0.0; any host holding it answers.
//! - IPv6: a neighbour solicitation for the address to its solicited-node
//!   group, from this host's link-local address; a host holding it answers
//!   with an advertisement (RFC 4861). (Duplicate address detection proper
//!   sends from the unspecified address, which the kernel keeps for its
//!   own use; the question and its answers are the same.)
//!
//! Frames are built and read by pure functions; probing needs CAP_NET_RAW.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::announce::{self, check, garp_frame, Fd, Mac, ETH_P_ARP, SOCKADDR_LL_LEN};

/// The Ethernet frame of an ARP probe for `ip` from `mac` (RFC 5227: a
/// request with sender address 0.0.0.0, so no cache learns anything).
pub fn probe_frame(mac: Mac, ip: Ipv4Addr) -> [u8; 42] {
    let mut f = garp_frame(mac, ip);
    f[28..32].copy_from_slice(&[0; 4]);
    f
}

/// Whether an ARP frame heard while probing for `ip` shows another host
/// using it (RFC 5227 section 2.1.1): it comes from a MAC other than
/// `mine` and has `ip` as its sender address, or it probes for `ip` too.
/// Returns that host's MAC.
pub fn conflict(frame: &[u8], mine: Mac, ip: Ipv4Addr) -> Option<Mac> {
    if frame.len() < 42 || frame[12..14] != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let sha: Mac = frame[22..28].try_into().ok()?;
    let (spa, tpa) = (&frame[28..32], &frame[38..42]);
    let request = frame[20..22] == [0, 1];
    let probing = request && spa == [0; 4] && tpa == ip.octets();
    (sha != mine && (spa == ip.octets() || probing)).then_some(sha)
}

/// Probe for `ip` on interface `index` (blocking): `rounds` probes,
/// `spacing` apart, listening all the while. The MAC of a host that holds
/// it, if one answered.
pub fn probe_arp(
    index: u32,
    mac: Mac,
    ip: Ipv4Addr,
    rounds: u32,
    spacing: Duration,
) -> io::Result<Option<Mac>> {
    let frame = probe_frame(mac, ip);
    let (fd, to) = announce::arp_socket(index)?;
    // Only this interface's frames.
    // SAFETY: the address is valid for its length.
    check(unsafe {
        libc::bind(
            fd.0,
            (&to as *const libc::sockaddr_ll).cast(),
            SOCKADDR_LL_LEN,
        )
    })?;
    receive_within(&fd, Duration::from_millis(5))?;
    let mut buf = [0u8; 64];
    for _ in 0..rounds {
        announce::send_frame(&fd, &frame, &to)?;
        let until = crate::clock::instant() + spacing;
        while crate::clock::instant() < until {
            // SAFETY: sockaddr_ll is plain old data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = SOCKADDR_LL_LEN;
            // SAFETY: the buffer and address are valid for their lengths.
            let n = unsafe {
                libc::recvfrom(
                    fd.0,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            // Our own probes come back as outgoing frames: not a conflict.
            if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            if let Some(other) = conflict(&buf[..n as usize], mac, ip) {
                return Ok(Some(other));
            }
        }
    }
    Ok(None)
}

/// The ICMPv6 body of a neighbour solicitation for `target` from `mac`
/// (with the source link-layer address option, so the answer needs no
/// solicitation of its own).
pub fn ns_body(mac: Mac, target: Ipv6Addr) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0] = 135; // neighbour solicitation
    b[8..24].copy_from_slice(&target.octets());
    b[24] = 1; // option: source link-layer address
    b[25] = 1; // length in units of 8 bytes
    b[26..32].copy_from_slice(&mac);
    b
}

/// The solicited-node multicast group of `ip` (RFC 4291 section 2.7.1).
pub fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// Whether an ICMPv6 message heard while probing for `ip` shows another
/// host holding it: an advertisement for `ip`. Returns the MAC it names
/// (its target link-layer address option), or zeros if it names none.
pub fn nd_conflict(body: &[u8], ip: Ipv6Addr) -> Option<Mac> {
    if body.len() < 24 || body[0] != 136 || body[8..24] != ip.octets() {
        return None;
    }
    let mut opts = &body[24..];
    while opts.len() >= 8 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            break;
        }
        if opts[0] == 2 && len >= 8 {
            return opts[2..8].try_into().ok();
        }
        opts = &opts[len..];
    }
    Some([0; 6])
}

/// Probe for `ip` on interface `index` (blocking), as [`probe_arp`] does
/// for IPv4.
pub fn probe_nd(
    index: u32,
    mac: Mac,
    ip: Ipv6Addr,
    rounds: u32,
    spacing: Duration,
) -> io::Result<Option<Mac>> {
    let fd = announce::icmp6_socket(index)?;
    receive_within(&fd, Duration::from_millis(5))?;
    let body = ns_body(mac, ip);
    let mut buf = [0u8; 256];
    for _ in 0..rounds {
        announce::send_icmp6(&fd, &body, solicited_node(ip), index)?;
        let until = crate::clock::instant() + spacing;
        while crate::clock::instant() < until {
            // SAFETY: sockaddr_in6 is plain old data.
            let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_in6>() as u32;
            // SAFETY: the buffer and address are valid for their lengths.
            let n = unsafe {
                libc::recvfrom(
                    fd.0,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_in6).cast(),
                    &mut from_len,
                )
            };
            // Answers from other links do not count.
            if n <= 0 || (from.sin6_scope_id != 0 && from.sin6_scope_id != index) {
                continue;
            }
            if let Some(other) = nd_conflict(&buf[..n as usize], ip) {
                return Ok(Some(other));
            }
        }
    }
    Ok(None)
}

/// Let reads on `fd` give up after `wait`.
fn receive_within(fd: &Fd, wait: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: wait.as_micros() as libc::suseconds_t,
    };
    // SAFETY: the option value lives across the call.
    check(unsafe {
        libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];

    #[test]
    fn a_probe_asks_for_the_address_from_nowhere() {
        let ip = Ipv4Addr::new(198, 18, 0, 100);
        let f = probe_frame(MAC, ip);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[22..28], &MAC, "sender MAC");
        assert_eq!(&f[28..32], &[0; 4], "sender IP 0.0.0.0");
        assert_eq!(&f[38..42], &ip.octets(), "target IP");
    }

    #[test]
    fn a_conflict_is_another_mac_using_or_probing_for_the_address() {
        let ip = Ipv4Addr::new(198, 18, 0, 100);
        let other = [0x02, 0, 0, 0, 0, 9];
        // An answer from a host holding it (reply, sender = the address).
        let mut reply = garp_frame(other, ip);
        reply[20..22].copy_from_slice(&[0, 2]);
        assert_eq!(conflict(&reply, MAC, ip), Some(other));
        // Its announcement, and its own probe for the address.
        assert_eq!(conflict(&garp_frame(other, ip), MAC, ip), Some(other));
        assert_eq!(conflict(&probe_frame(other, ip), MAC, ip), Some(other));
        // Not: our own frames, another address, a question about it from
        // a host that does not claim it, a short or non-ARP frame.
        assert_eq!(conflict(&garp_frame(MAC, ip), MAC, ip), None);
        assert_eq!(conflict(&probe_frame(MAC, ip), MAC, ip), None);
        let elsewhere = Ipv4Addr::new(198, 18, 0, 101);
        assert_eq!(conflict(&garp_frame(other, elsewhere), MAC, ip), None);
        let mut asking = garp_frame(other, Ipv4Addr::new(198, 18, 0, 10));
        asking[38..42].copy_from_slice(&ip.octets());
        assert_eq!(conflict(&asking, MAC, ip), None);
        assert_eq!(conflict(&reply[..30], MAC, ip), None);
        let mut ipv4 = reply;
        ipv4[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(conflict(&ipv4, MAC, ip), None);
    }

    #[test]
    fn a_solicitation_asks_the_address_s_group_and_names_the_asker() {
        let ip: Ipv6Addr = "2001:db8::12:3456".parse().unwrap();
        let b = ns_body(MAC, ip);
        assert_eq!(b[0], 135);
        assert_eq!(&b[8..24], &ip.octets());
        assert_eq!(&b[24..26], &[1, 1]);
        assert_eq!(&b[26..32], &MAC);
        let group: Ipv6Addr = "ff02::1:ff12:3456".parse().unwrap();
        assert_eq!(solicited_node(ip), group);
    }

    #[test]
    fn an_advertisement_for_the_address_is_a_conflict_naming_its_mac() {
        let ip: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let other = [0x02, 0, 0, 0, 0, 9];
        let na = announce::unsolicited_na(other, ip);
        assert_eq!(nd_conflict(&na, ip), Some(other));
        // Without the option: a conflict all the same.
        assert_eq!(nd_conflict(&na[..24], ip), Some([0; 6]));
        // Not: another address, a solicitation, a short message.
        let elsewhere: Ipv6Addr = "2001:db8::101".parse().unwrap();
        assert_eq!(nd_conflict(&na, elsewhere), None);
        assert_eq!(nd_conflict(&ns_body(other, ip), ip), None);
        assert_eq!(nd_conflict(&na[..20], ip), None);
    }
}
