//! Shadow copies: every message a node accepts is durable on other
//! members too before it says "250", so that a node lost for good takes
//! no acknowledged message with it.
//!
//! - [`holder`]: the receiving side; a primary's shadows kept in a spool
//!   of their own under `<data_dir>/shadows/<primary>/`, with the read
//!   API the promotion of a dead primary's shadows uses;
//! - [`replicate`]: the sending side; a [`Spool`](crate::spool::Spool)
//!   around the local one that copies each stored message to holders
//!   chosen by rendezvous hashing, then forwards its progress;
//! - [`cluster`]: the [`replicate::Replicas`] the cluster gives;
//! - [`promote`]: taking a fenced primary's copies over, and on the
//!   primary, dropping what the takers deliver.
//!
//! May import: `spool`, `queue`, `cluster`, `config`, `metrics`, `events`,
//! `clock`. Nothing under `cluster`, `spool` or `queue` imports it.

pub mod cluster;
pub mod holder;
pub mod promote;
pub mod replicate;

pub use holder::Holder;
pub use replicate::{Replicas, ReplicatedSpool};
