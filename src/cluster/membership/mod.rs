//! Membership: who is in the cluster. The pure decisions of joining and
//! admitting ([`decide`]), the joining node's loop ([`join`]), the
//! leader's side of a join carried out through openraft ([`admit`]), and
//! failure detection with elections ([`detector`]).
//!
//! May import: `cluster::identity`, `cluster::link`, `cluster::rpc`,
//! `cluster::raft` and `cluster::state`.

pub mod admit;
pub mod decide;
pub mod detector;
pub mod join;

pub use decide::*;
