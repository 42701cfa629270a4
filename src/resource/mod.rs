//! Resource groups on this node: the VIP, the SMTP listener on it and the
//! outbound source address. The [`runner`] drives each group's pure
//! [`machine`], and runs every start, stop and check in a task of its own
//! under a deadline ([`run_op`]), so a hung or panicking resource is a
//! failure to handle, never a hang of the node or its admin interface.
//!
//! May import: `cluster` (the handle, leases, the state's group
//! records), `smtp`, `spool`, `config` and `clock`.

pub mod announce;
pub mod claim;
pub mod gate;
pub mod listener;
pub mod machine;
pub mod netlink;
pub mod runner;
pub mod setup;
pub mod source;
pub mod vip;

use tokio::time::{timeout_at, Instant};

/// A resource operation: Ok, or why it failed.
pub type OpFuture = futures_util::future::BoxFuture<'static, Result<(), String>>;

/// Something a group brings up on its owner.
///
/// A group starts its resources in order and stops them in the same
/// order, the address first: once the lease is lost, what the next owner
/// will take over must be gone from here before anything else is tidied.
pub trait Resource: Send + Sync + 'static {
    /// For logs and reports: "vip 198.18.0.100", "smtp 198.18.0.100:25".
    fn name(&self) -> String;
    /// Make sure no other host holds it now (a former owner that froze
    /// may still): Err names who does. It changes nothing.
    fn claim(&self) -> OpFuture {
        Box::pin(async { Ok(()) })
    }
    /// Bring it up.
    fn start(&self) -> OpFuture;
    /// Before a handover: let open work finish, for at most the
    /// resource's own drain time, while the lease is still renewed.
    fn drain(&self) -> OpFuture {
        Box::pin(async { Ok(()) })
    }
    /// Bring it down now: nothing waits for open work.
    fn stop(&self) -> OpFuture;
    /// Is it healthy?
    fn check(&self) -> OpFuture;
    /// A drain in flight must end now (the lease got short).
    fn hurry(&self) {}
    /// The group's lease now holds until `until`: nothing of this resource
    /// may act for the group past it, even if the process stops running.
    fn lease(&self, _until: Instant) {}
}

/// Run `op` in its own task until `deadline`. A hang (the deadline
/// passes), a panic and an error are all failures, named after `what`;
/// the caller never waits past the deadline.
pub async fn run_op(what: String, op: OpFuture, deadline: Instant) -> Result<(), String> {
    let task = tokio::spawn(op);
    let abort = task.abort_handle();
    match timeout_at(deadline, task).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(why))) => Err(format!("{what}: {why}")),
        Ok(Err(e)) if e.is_panic() => Err(format!("{what}: panicked")),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => {
            // A task stuck in blocking code cannot be stopped; it is left
            // behind, and nothing waits for it.
            abort.abort();
            Err(format!("{what}: did not finish in time"))
        }
    }
}

#[cfg(test)]
#[path = "mod_tests.rs"]
mod tests;
