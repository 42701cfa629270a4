//! Resource groups, the cluster's side: leases granted by voters
//! ([`lease`]), where groups go ([`placement`]), the leader's manager that
//! carries placement out ([`manager`]), and the service that answers group
//! calls on every node ([`service`]), and the [`handle`] through which
//! the manager, the owner's side and the admin API reach the cluster. The
//! owner's side — starting and stopping resources — is `crate::resource`.
//!
//! May import: `cluster::identity`, `cluster::link` (a peer's address and
//! keys), `cluster::rpc`, `cluster::raft` and `cluster::state`.

pub mod handle;
pub mod lease;
pub mod manager;
pub mod placement;
pub mod service;
