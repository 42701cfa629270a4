//! The delivery gate as a group resource: the runner of a member's
//! delivery group opens it when it holds the lease, keeps its end in step
//! with every renewal, and shuts it when the lease is gone or going.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::{OpFuture, Resource};
use crate::delivery::gate::Gate;

/// Opens and shuts the node's delivery gate with its delivery lease.
pub struct DeliveryGate {
    gate: Arc<Gate>,
    /// The end of the last lease the runner told of.
    lease: Mutex<Option<Instant>>,
}

impl DeliveryGate {
    /// The resource that drives `gate`.
    pub fn new(gate: Arc<Gate>) -> DeliveryGate {
        DeliveryGate {
            gate,
            lease: Mutex::new(None),
        }
    }
}

impl Resource for DeliveryGate {
    fn name(&self) -> String {
        "delivery".into()
    }

    fn start(&self) -> OpFuture {
        let lease = *self.lease.lock().unwrap_or_else(|e| e.into_inner());
        let gate = self.gate.clone();
        Box::pin(async move {
            // Started only under a lease; without one it would be open
            // for no time at all, which is what an error says better.
            let until = lease.ok_or_else(|| "no lease to deliver under".to_string())?;
            gate.open_until(until);
            tracing::info!("delivery gate open: this node holds its delivery lease");
            Ok(())
        })
    }

    fn stop(&self) -> OpFuture {
        self.gate.shut_now();
        tracing::info!(
            "delivery gate shut: this node delivers nothing until it holds its lease again"
        );
        Box::pin(async { Ok(()) })
    }

    fn check(&self) -> OpFuture {
        Box::pin(async { Ok(()) })
    }

    fn lease(&self, until: Instant) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
        self.gate.extend(until);
    }
}
