//! Telling the LAN that an address moved here: gratuitous ARP for IPv4
//! (an ARP request for the address from itself, broadcast on the link) and
//! an unsolicited neighbour advertisement for IPv6 (to all nodes, with the
//! override flag), both carrying this interface's MAC. Switches and hosts
//! then send to the new owner without waiting for their caches to expire.
//!
//! Before claiming an IPv4 address, the new owner probes for it (RFC 5227
//! address conflict detection, on a faster schedule: a LAN answers within
//! a millisecond): an ARP request for the address from 0.0.0.0. Any host
//! that still holds it answers, and so does the kernel of a former owner
//! frozen with the address still on its interface.
//!
//! The frames are built and read by pure functions; sending needs
//! CAP_NET_RAW.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A MAC address.
pub type Mac = [u8; 6];

const ETH_P_ARP: u16 = 0x0806;

/// "aa:bb:cc:dd:ee:ff".
pub fn mac_text(mac: &Mac) -> String {
    let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

/// The Ethernet frame of a gratuitous ARP request announcing `ip` at `mac`.
pub fn garp_frame(mac: Mac, ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]); // broadcast
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target MAC left zero (RFC 5227 announcement); target IP = sender IP.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

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

/// The ICMPv6 body of an unsolicited neighbour advertisement for `ip` at
/// `mac` (the kernel fills in the checksum on a raw ICMPv6 socket).
pub fn unsolicited_na(mac: Mac, ip: Ipv6Addr) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0] = 136; // neighbour advertisement
    b[4] = 0x20; // override; not solicited, not a router
    b[8..24].copy_from_slice(&ip.octets());
    b[24] = 2; // option: target link-layer address
    b[25] = 1; // length in units of 8 bytes
    b[26..32].copy_from_slice(&mac);
    b
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A socket that closes itself.
struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the fd was returned by socket() and is closed once.
        unsafe { libc::close(self.0) };
    }
}

/// An ARP packet socket and the broadcast address on interface `index`.
fn arp_socket(index: u32) -> io::Result<(Fd, libc::sockaddr_ll)> {
    let proto = ETH_P_ARP.to_be();
    // SAFETY: plain socket creation; the result is checked.
    let fd = Fd(check(unsafe {
        libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto))
    })?);
    // SAFETY: sockaddr_ll is plain old data; zeroed is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = proto;
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    Ok((fd, to))
}

const SOCKADDR_LL_LEN: u32 = std::mem::size_of::<libc::sockaddr_ll>() as u32;

/// Send `frame` to `to` on `fd`.
fn send_frame(fd: &Fd, frame: &[u8], to: &libc::sockaddr_ll) -> io::Result<()> {
    // SAFETY: the buffer and address are valid for the lengths given.
    check(unsafe {
        libc::sendto(
            fd.0,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (to as *const libc::sockaddr_ll).cast(),
            SOCKADDR_LL_LEN,
        ) as libc::c_int
    })?;
    Ok(())
}

/// Broadcast a gratuitous ARP for `ip` on interface `index`.
pub fn send_garp(index: u32, mac: Mac, ip: Ipv4Addr) -> io::Result<()> {
    let (fd, to) = arp_socket(index)?;
    send_frame(&fd, &garp_frame(mac, ip), &to)
}

/// Probe for `ip` on interface `index` (blocking): `rounds` probes,
/// `spacing` apart, listening all the while. The MAC of a host that holds
/// it, if one answered.
pub fn probe(
    index: u32,
    mac: Mac,
    ip: Ipv4Addr,
    rounds: u32,
    spacing: std::time::Duration,
) -> io::Result<Option<Mac>> {
    let frame = probe_frame(mac, ip);
    let (fd, to) = arp_socket(index)?;
    // Only this interface's frames.
    // SAFETY: the address is valid for its length.
    check(unsafe {
        libc::bind(
            fd.0,
            (&to as *const libc::sockaddr_ll).cast(),
            SOCKADDR_LL_LEN,
        )
    })?;
    let wait = libc::timeval {
        tv_sec: 0,
        tv_usec: 5_000,
    };
    // SAFETY: the option value lives across the call.
    check(unsafe {
        libc::setsockopt(
            fd.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&wait as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    })?;
    let mut buf = [0u8; 64];
    for _ in 0..rounds {
        send_frame(&fd, &frame, &to)?;
        let until = std::time::Instant::now() + spacing;
        while std::time::Instant::now() < until {
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

/// Send an unsolicited neighbour advertisement for `ip` to all nodes on
/// interface `index`.
pub fn send_na(index: u32, mac: Mac, ip: Ipv6Addr) -> io::Result<()> {
    let body = unsolicited_na(mac, ip);
    // SAFETY: plain socket creation; the result is checked.
    let fd = Fd(check(unsafe {
        libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)
    })?);
    // Neighbour discovery messages must arrive with hop limit 255.
    let hops: libc::c_int = 255;
    let ifindex = index as libc::c_int;
    for (opt, val) in [
        (libc::IPV6_MULTICAST_HOPS, &hops),
        (libc::IPV6_MULTICAST_IF, &ifindex),
    ] {
        // SAFETY: the option value is a c_int that lives across the call.
        check(unsafe {
            libc::setsockopt(
                fd.0,
                libc::IPPROTO_IPV6,
                opt,
                (val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        })?;
    }
    // SAFETY: sockaddr_in6 is plain old data; zeroed is a valid value.
    let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    to.sin6_family = libc::AF_INET6 as u16;
    to.sin6_addr.s6_addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
    to.sin6_scope_id = index;
    // SAFETY: the buffer and address are valid for the lengths given.
    check(unsafe {
        libc::sendto(
            fd.0,
            body.as_ptr().cast(),
            body.len(),
            0,
            (&to as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        ) as libc::c_int
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];

    #[test]
    fn a_gratuitous_arp_is_a_broadcast_request_for_the_address_from_itself() {
        let f = garp_frame(MAC, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &MAC, "sender MAC");
        assert_eq!(&f[28..32], &[198, 18, 0, 100], "sender IP");
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[198, 18, 0, 100], "target IP");
    }

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
    fn an_unsolicited_advertisement_overrides_and_names_the_mac() {
        let ip: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let b = unsolicited_na(MAC, ip);
        assert_eq!(b[0], 136);
        assert_eq!(b[1], 0, "code");
        assert_eq!(b[4], 0x20, "override only");
        assert_eq!(&b[8..24], &ip.octets());
        assert_eq!(&b[24..26], &[2, 1]);
        assert_eq!(&b[26..32], &MAC);
    }
}
