//! mtad: a clustered SMTP message-transfer daemon.
//!
//! The binary in `main.rs` is a thin shell; everything lives here so that
//! integration tests can drive a whole node in-process.

pub mod admin;
pub mod app;
pub mod backoff;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod dns;
pub mod dsn;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod lock;
pub mod metrics;
pub mod notify;
pub mod queue;
pub mod reload;
pub mod resource;
pub mod routing;
pub mod shadow;
pub mod smtp;
pub mod spool;
