//! The link layer: authenticated, encrypted node-to-node connections.
//! The transport trait (TCP, or the in-memory network tests partition),
//! length-prefixed frames, the wire messages of the handshake, the pure
//! handshake machine, frame sealing, and the driver that runs them over a
//! stream ([`conn`]).
//!
//! May import: `cluster::identity` (names, incarnations, secrets) and
//! nothing else of the cluster — every layer above builds on this one.

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod memnet;
pub mod message;
pub mod seal;
pub mod transport;

pub use conn::*;
