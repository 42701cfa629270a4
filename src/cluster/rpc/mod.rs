//! Calls between nodes: the request and reply types of every service
//! ([`messages`]; raft's RPCs, membership calls, status, and the group
//! service's and the shadow service's calls), the client that makes them over a link ([`peer`]),
//! and the server that accepts links and hands each call to a handler
//! ([`server`]).
//!
//! May import: `cluster::identity`, `cluster::link` and `cluster::state`.

pub mod group;
pub mod messages;
pub mod peer;
pub mod server;
pub mod shadow;

pub use messages::*;
