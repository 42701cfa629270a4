//! Inbound SMTP: `session` is the pure protocol machine, `server` the
//! socket driver (listeners, accept loop, one task per connection).
//! `address` (MAIL/RCPT paths) and `data` (the strict DATA receiver) are
//! the session's private helpers.
//!
//! May import: `config`, `spool` and `metrics`.

mod address;
pub mod auth;
pub mod budget;
pub mod clients;
mod data;
pub mod memory;
pub mod server;
pub mod session;
pub mod tls;

/// The files `[smtp]` names — the TLS certificate and key, the AUTH
/// credentials — that do not load, and why.
pub fn check_files(cfg: &crate::config::SmtpConfig) -> Vec<FileProblem> {
    let problem = |field: &str, message: String| FileProblem {
        field: field.to_string(),
        message,
    };
    let mut problems = Vec::new();
    if let Some(Err(e)) = cfg.tls.as_ref().map(tls::acceptor) {
        problems.push(problem("smtp.tls", e.to_string()));
    }
    if let Some(Err(e)) = cfg.auth.as_deref().map(auth::Credentials::load) {
        problems.push(problem("smtp.auth", e.to_string()));
    }
    problems
}

use crate::config::FileProblem;
use std::net::IpAddr;

use bytes::Bytes;

use crate::spool::QueueId;

/// A complete message received from a client, handed to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Reverse path, empty for `<>`.
    pub sender: String,
    /// Accepted forward paths.
    pub recipients: Vec<String>,
    /// The content, dot-unstuffed, CRLF line endings, without the final `.`.
    pub body: Bytes,
    /// The client's address.
    pub client_ip: IpAddr,
    /// What the client said in EHLO/HELO.
    pub helo: String,
    /// Whether it came over TLS.
    pub tls: bool,
    /// Who authenticated (SMTP AUTH), if anyone.
    pub user: Option<String>,
}

/// Where the server hands messages: the node stores them durably and
/// returns the queue id only once the message is on disk.
pub trait Accept: Send + Sync + 'static {
    /// Store the message; Ok means durable and the client may get "250".
    fn accept(&self, message: Incoming) -> crate::spool::SpoolFuture<'_, QueueId>;
}
