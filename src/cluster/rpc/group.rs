//! The group service's calls: leases granted by voters, outstanding grants
//! asked by a leader freeing a group, and records (reports, fences,
//! drains) written by the leader.

use serde::{Deserialize, Serialize};

use crate::cluster::state::groups::GroupCommand;
use crate::cluster::state::NodeId;

/// A group call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupRequest {
    /// To a voter: grant the caller `group` under `epoch` for `ttl_ms`.
    Grant {
        /// The group.
        group: String,
        /// The caller's epoch.
        epoch: u64,
        /// How long it asks for.
        ttl_ms: u64,
    },
    /// To a voter, from the leader: how long may grants for `group` still
    /// last, now that `epoch` is revoked?
    Outstanding {
        /// The group.
        group: String,
        /// The revoked epoch.
        epoch: u64,
    },
    /// To the leader: record this report or fence, about the caller.
    Record(GroupCommand),
    /// To the leader, from an operator through any node: drain `node` (or
    /// end its drain).
    SetDrain {
        /// The member.
        node: NodeId,
        /// True to drain.
        draining: bool,
    },
}

/// The answer to a [`GroupRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupReply {
    /// Granted for this long.
    Granted {
        /// Milliseconds.
        ttl_ms: u64,
    },
    /// Grants may last this much longer; None: this voter has not applied
    /// the revoke yet, so it cannot say.
    Outstanding {
        /// Milliseconds.
        remaining_ms: Option<u64>,
    },
    /// Written to the log.
    Recorded,
    /// Not done, and why.
    Refused(String),
}
