//! Resource groups on this node: the VIP, the SMTP listener on it and the
//! outbound source address. The [`runner`] drives each group's pure
//! [`machine`], and runs every start, stop and check in a task of its own
//! under a deadline ([`run_op`]), so a hung or panicking resource is a
//! failure to handle, never a hang of the node or its admin interface.

pub mod announce;
pub mod listener;
pub mod machine;
pub mod netlink;
pub mod runner;
pub mod setup;
pub mod source;
pub mod vip;

use std::future::Future;
use std::pin::Pin;

use tokio::time::{timeout_at, Instant};

/// A resource operation: Ok, or why it failed.
pub type OpFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// Something a group brings up on its owner.
pub trait Resource: Send + Sync + 'static {
    /// For logs and reports: "vip 198.18.0.100", "smtp 198.18.0.100:25".
    fn name(&self) -> String;
    /// Bring it up.
    fn start(&self) -> OpFuture;
    /// Bring it down; `graceful` lets open work finish first (bounded by
    /// the resource's own drain time).
    fn stop(&self, graceful: bool) -> OpFuture;
    /// Is it healthy?
    fn check(&self) -> OpFuture;
    /// A graceful stop in flight must end now (the lease got short):
    /// stop waiting for open work.
    fn hurry(&self) {}
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
