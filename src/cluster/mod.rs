//! The cluster: nodes that find each other, agree on a replicated state
//! through openraft, and place resource groups on one node at a time.
//!
//! Layers, lowest first; a layer imports only those before it (cross-layer
//! tests aside, and for now the leader's group manager, which works
//! through [`handle`]):
//! - [`identity`]: who this node is, and the cluster secrets;
//! - [`link`]: authenticated, encrypted connections between nodes;
//! - [`state`]: the replicated state and the commands that change it;
//! - [`rpc`]: the calls nodes make to each other, their client and server;
//! - [`raft`]: openraft's network and durable storage;
//! - [`membership`]: joining, admission, failure detection;
//! - [`groups`]: leases, placement, the leader's manager, the group service;
//! - [`service`] (what this node answers), [`handle`] (what the rest of
//!   mtad may ask of the cluster) and [`node`] (starting and stopping it).

pub mod groups;
pub mod handle;
pub mod identity;
pub mod link;
pub mod membership;
pub mod node;
pub mod raft;
pub mod rpc;
pub mod service;
pub mod state;

pub use state::{
    ClusterState, Command, Member, MemberState, NodeId, NodeState, Response, Role, TypeConfig,
};

#[cfg(test)]
mod tests;
