//! The VIP resource. The loopback provider adds nothing: the address must
//! already be local (e.g. 127.0.0.100, or an address an operator manages);
//! exclusive binding of the listener on it is what proves single
//! ownership. The netlink provider adds and removes the address itself.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use super::{OpFuture, Resource};

/// A VIP that is already configured on this host.
pub struct LoopbackVip {
    addr: IpAddr,
}

impl LoopbackVip {
    /// The provider for `addr`.
    pub fn new(addr: IpAddr) -> LoopbackVip {
        LoopbackVip { addr }
    }
}

/// Whether `addr` is an address of this host: only then can a socket be
/// bound to it without IP_FREEBIND.
fn local(addr: IpAddr) -> Result<(), String> {
    UdpSocket::bind(SocketAddr::new(addr, 0))
        .map(drop)
        .map_err(|e| {
            format!(
                "{addr} is not an address of this host ({e}); the loopback provider adds nothing"
            )
        })
}

impl Resource for LoopbackVip {
    fn name(&self) -> String {
        format!("vip {}", self.addr)
    }

    fn start(&self) -> OpFuture {
        let addr = self.addr;
        Box::pin(async move { local(addr) })
    }

    fn stop(&self) -> OpFuture {
        Box::pin(async { Ok(()) })
    }

    fn check(&self) -> OpFuture {
        let addr = self.addr;
        Box::pin(async move { local(addr) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_address_is_up_and_a_foreign_one_is_refused() {
        let vip = LoopbackVip::new("127.0.0.100".parse().unwrap());
        assert_eq!(vip.start().await, Ok(()));
        assert_eq!(vip.check().await, Ok(()));
        assert_eq!(vip.stop().await, Ok(()));
        // 198.18.0.0/15 is not on this host outside a test namespace.
        let foreign = LoopbackVip::new("198.18.255.254".parse().unwrap());
        let err = foreign.start().await.unwrap_err();
        assert!(err.contains("not an address of this host"), "{err}");
    }
}
