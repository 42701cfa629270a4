//! Telling the LAN that an address moved here: gratuitous ARP for IPv4
//! (an ARP request for the address from itself, broadcast on the link) and
//! an unsolicited neighbour advertisement for IPv6 (to all nodes, with the
//! override flag), both carrying this interface's MAC. Switches and hosts
//! then send to the new owner without waiting for their caches to expire.
//!
//! The frames are built by pure functions; sending needs CAP_NET_RAW.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A MAC address.
pub type Mac = [u8; 6];

pub(super) const ETH_P_ARP: u16 = 0x0806;

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

pub(super) fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A socket that closes itself.
pub(super) struct Fd(pub(super) libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the fd was returned by socket() and is closed once.
        unsafe { libc::close(self.0) };
    }
}

/// An ARP packet socket and the broadcast address on interface `index`.
pub(super) fn arp_socket(index: u32) -> io::Result<(Fd, libc::sockaddr_ll)> {
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

pub(super) const SOCKADDR_LL_LEN: u32 = std::mem::size_of::<libc::sockaddr_ll>() as u32;

/// Send `frame` to `to` on `fd`.
pub(super) fn send_frame(fd: &Fd, frame: &[u8], to: &libc::sockaddr_ll) -> io::Result<()> {
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

/// Send an unsolicited neighbour advertisement for `ip` to all nodes on
/// interface `index`.
pub fn send_na(index: u32, mac: Mac, ip: Ipv6Addr) -> io::Result<()> {
    let fd = icmp6_socket(index)?;
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    send_icmp6(&fd, &unsolicited_na(mac, ip), all_nodes, index)
}

/// An ICMPv6 raw socket that sends neighbour discovery on interface
/// `index` (the kernel fills in checksums).
pub(super) fn icmp6_socket(index: u32) -> io::Result<Fd> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = Fd(check(unsafe {
        libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)
    })?);
    // Neighbour discovery messages must arrive with hop limit 255.
    let hops: libc::c_int = 255;
    let ifindex = index as libc::c_int;
    for (opt, val) in [
        (libc::IPV6_MULTICAST_HOPS, &hops),
        (libc::IPV6_UNICAST_HOPS, &hops),
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
    Ok(fd)
}

/// Send the ICMPv6 message `body` to `to` on interface `index`.
pub(super) fn send_icmp6(fd: &Fd, body: &[u8], to: Ipv6Addr, index: u32) -> io::Result<()> {
    // SAFETY: sockaddr_in6 is plain old data; zeroed is a valid value.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as u16;
    addr.sin6_addr.s6_addr = to.octets();
    addr.sin6_scope_id = index;
    // SAFETY: the buffer and address are valid for the lengths given.
    check(unsafe {
        libc::sendto(
            fd.0,
            body.as_ptr().cast(),
            body.len(),
            0,
            (&addr as *const libc::sockaddr_in6).cast(),
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
