//! Resource groups, the cluster's side: leases granted by voters
//! ([`lease`]), where groups go ([`placement`]), the leader's manager that
//! carries placement out ([`manager`]), and the service that answers group
//! calls on every node ([`service`]). The owner's side — starting and
//! stopping resources — is `crate::resource`.
//!
//! May import: `cluster::identity`, `cluster::rpc`, `cluster::raft`,
//! `cluster::state` and `cluster::handle`.

pub mod lease;
pub mod manager;
pub mod placement;
pub mod service;
