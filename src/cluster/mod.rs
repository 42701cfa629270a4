//! The cluster: nodes that find each other, agree on a replicated state
//! through openraft, and place resource groups on one node at a time.
//!
//! Layers, lowest first; a layer imports only those before it (cross-layer
//! tests aside; `tests/layers.rs` checks it):
//! - [`identity`]: who this node is, and the cluster secrets;
//! - [`link`]: authenticated, encrypted connections between nodes;
//! - [`state`]: the replicated state and the commands that change it;
//! - [`rpc`]: the calls nodes make to each other, their client and server;
//! - [`raft`]: openraft's network and durable storage;
//! - [`membership`]: joining, admission, failure detection;
//! - [`groups`]: leases, placement, the leader's manager, the group service,
//!   and the [`ClusterHandle`] the rest of mtad asks the cluster through;
//! - [`service`] (what this node answers) and [`node`] (starting and
//!   stopping it).

pub mod groups;
pub mod identity;
pub mod link;
pub mod membership;
pub mod node;
pub mod raft;
pub mod rpc;
pub mod service;
pub mod state;

pub use groups::handle::ClusterHandle;
pub use state::{
    ClusterState, Command, Member, MemberState, NodeId, NodeState, Response, Role, TypeConfig,
};

#[cfg(test)]
mod tests;
