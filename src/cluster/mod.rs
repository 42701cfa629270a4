//! The cluster: authenticated node-to-node transport, the join handshake
//! (membership), and the replicated cluster state run by openraft.
//!
//! Work in progress (issue 3): the pieces land one by one, each tested,
//! before a node runs them.

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
#[path = "sim_tests.rs"]
mod sim;
