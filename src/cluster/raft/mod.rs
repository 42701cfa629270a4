//! Raft: openraft's network over cluster links ([`network`]) and the
//! durable storage of the cluster log and state machine ([`store`]).
//!
//! May import: `cluster::identity`, `cluster::link`, `cluster::rpc`,
//! `cluster::rpc::peer` and `cluster::state`.

pub mod network;
pub mod store;
