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
    lease: Arc<Mutex<Option<Instant>>>,
    /// What must be done before the gate opens.
    ready: Option<Ready>,
}

/// Answers once the node may deliver as far as anything but the lease
/// goes (a takeover of its shadow copies settled first).
pub type Ready = Arc<dyn Fn() -> OpFuture + Send + Sync>;

impl DeliveryGate {
    /// The resource that drives `gate`, opening it once `ready` answers.
    pub fn new(gate: Arc<Gate>, ready: Option<Ready>) -> DeliveryGate {
        DeliveryGate {
            gate,
            lease: Arc::default(),
            ready,
        }
    }
}

impl Resource for DeliveryGate {
    fn name(&self) -> String {
        "delivery".into()
    }

    fn start(&self) -> OpFuture {
        let ready = self.ready.as_ref().map(|r| r());
        let gate = self.gate.clone();
        let lease = self.lease.clone();
        Box::pin(async move {
            if let Some(ready) = ready {
                ready.await?;
            }
            // Started only under a lease; without one it would be open
            // for no time at all, which is what an error says better.
            // The lease as renewed while it waited.
            let until = *lease.lock().unwrap_or_else(|e| e.into_inner());
            let until = until.ok_or_else(|| "no lease to deliver under".to_string())?;
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
