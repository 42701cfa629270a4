//! The outbound source address: while a group is online here, associations
//! of routes that name no `source_address` leave from its VIP, so next hops
//! see the VIP in both directions.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use super::{OpFuture, Resource};

/// The source address routes use by default; shared with delivery.
#[derive(Debug, Clone, Default)]
pub struct SourceSlot(Arc<RwLock<Option<IpAddr>>>);

impl SourceSlot {
    /// The address now, if a group is online.
    pub fn get(&self) -> Option<IpAddr> {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, from: Option<IpAddr>, to: Option<IpAddr>) {
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        // With several groups here, only the one that set it clears it.
        if from.is_none() || *slot == from {
            *slot = to;
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
        self.slot.set(None, Some(self.addr));
        Box::pin(async { Ok(()) })
    }

    fn stop(&self, _graceful: bool) -> OpFuture {
        self.slot.set(Some(self.addr), None);
        Box::pin(async { Ok(()) })
    }

    fn check(&self) -> OpFuture {
        let ok = self.slot.get() == Some(self.addr);
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
    async fn the_slot_follows_the_group_and_one_group_does_not_clear_another() {
        let slot = SourceSlot::default();
        let a = DeliverySource::new(slot.clone(), "198.18.0.100".parse().unwrap());
        let b = DeliverySource::new(slot.clone(), "198.18.0.101".parse().unwrap());
        a.start().await.unwrap();
        assert_eq!(slot.get(), Some("198.18.0.100".parse().unwrap()));
        a.check().await.unwrap();
        b.start().await.unwrap();
        assert!(a.check().await.is_err());
        a.stop(true).await.unwrap();
        assert_eq!(slot.get(), Some("198.18.0.101".parse().unwrap()));
        b.stop(false).await.unwrap();
        assert_eq!(slot.get(), None);
    }
}
