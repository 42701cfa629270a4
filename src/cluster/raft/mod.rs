//! Raft: openraft's network over cluster links ([`network`]) and the
//! durable storage of the cluster log and state machine ([`store`]).
//!
//! May import: `cluster::link`, `cluster::rpc` and `cluster::state`.

pub mod network;
pub mod store;
