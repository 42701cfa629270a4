//! The outbound source address: while a group is online here, associations
//! of routes that name no `source_address` leave from its VIP, so next hops
//! see the VIP in both directions. With several groups online here, mail
//! leaves from the VIP of the one online longest. When the group stops,
//! associations from its VIP are cut at once: the next owner now holds
//! the address, and nothing may go on leaving from it here.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use super::{OpFuture, Resource};

/// What is told when an address is withdrawn.
type Withdraw = Arc<dyn Fn(IpAddr) + Send + Sync>;

/// The source address routes use by default; shared with delivery.
#[derive(Clone, Default)]
pub struct SourceSlot {
    addrs: Arc<RwLock<Vec<IpAddr>>>,
    withdrawn: Arc<RwLock<Vec<Withdraw>>>,
}

impl SourceSlot {
    /// Call `f` with each address as it is withdrawn (delivery cuts the
    /// associations that leave from it).
    pub fn on_withdraw(&self, f: impl Fn(IpAddr) + Send + Sync + 'static) {
        self.withdrawn
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(f));
    }

    /// The address now, if a group is online.
    pub fn get(&self) -> Option<IpAddr> {
        self.addrs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .copied()
    }

    fn offered(&self, addr: IpAddr) -> bool {
        self.addrs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&addr)
    }

    fn offer(&self, addr: IpAddr, on: bool) {
        {
            let mut slot = self.addrs.write().unwrap_or_else(|e| e.into_inner());
            slot.retain(|a| *a != addr);
            if on {
                slot.push(addr);
                return;
            }
        }
        let told = self
            .withdrawn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for f in told {
            f(addr);
        }
    }
}

/// The resource that points the slot at a group's VIP.
pub struct DeliverySource {
    slot: SourceSlot,
    addr: IpAddr,
}

impl DeliverySource {
    /// Point `slot` at `addr` while running.
    pub fn new(slot: SourceSlot, addr: IpAddr) -> DeliverySource {
        DeliverySource { slot, addr }
    }
}

impl Resource for DeliverySource {
    fn name(&self) -> String {
        format!("outbound source {}", self.addr)
    }

    fn start(&self) -> OpFuture {
        self.slot.offer(self.addr, true);
        Box::pin(async { Ok(()) })
    }

    fn stop(&self) -> OpFuture {
        self.slot.offer(self.addr, false);
        Box::pin(async { Ok(()) })
    }

    fn check(&self) -> OpFuture {
        let ok = self.slot.offered(self.addr);
        let addr = self.addr;
        Box::pin(async move {
            if ok {
                Ok(())
            } else {
                Err(format!("outbound source is not {addr}"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_tells_delivery_the_address_is_withdrawn() {
        let slot = SourceSlot::default();
        let told = Arc::new(RwLock::new(Vec::new()));
        let t = told.clone();
        slot.on_withdraw(move |a| t.write().unwrap().push(a));
        let vip: IpAddr = "198.18.0.100".parse().unwrap();
        let a = DeliverySource::new(slot.clone(), vip);
        a.start().await.unwrap();
        assert!(told.read().unwrap().is_empty());
        a.stop().await.unwrap();
        assert_eq!(*told.read().unwrap(), [vip]);
    }

    #[tokio::test]
    async fn the_slot_follows_the_groups_and_two_groups_live_side_by_side() {
        let slot = SourceSlot::default();
        let a = DeliverySource::new(slot.clone(), "198.18.0.100".parse().unwrap());
        let b = DeliverySource::new(slot.clone(), "198.18.0.101".parse().unwrap());
        assert!(a.check().await.is_err(), "not started");
        a.start().await.unwrap();
        assert_eq!(slot.get(), Some("198.18.0.100".parse().unwrap()));
        a.check().await.unwrap();
        b.start().await.unwrap();
        // Both healthy (one failing would restart it, and then the other).
        a.check().await.unwrap();
        b.check().await.unwrap();
        assert_eq!(slot.get(), Some("198.18.0.100".parse().unwrap()));
        a.stop().await.unwrap();
        assert_eq!(slot.get(), Some("198.18.0.101".parse().unwrap()));
        b.stop().await.unwrap();
        assert_eq!(slot.get(), None);
    }
}
