//! The group service's calls: leases granted by voters, outstanding grants
//! asked by a leader freeing a group, and records (reports, fences,
//! drains) written by the leader.

use serde::{Deserialize, Serialize};

use crate::cluster::state::groups::GroupCommand;
use crate::cluster::state::{NodeId, Response};

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
    Refused(Refusal),
}

/// Why a group call was not done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// A grant was asked of a node that does not vote.
    #[error("this node does not vote")]
    NotAVoter,
    /// The voter could not make the lease length durable, so it may not
    /// promise it.
    #[error("cannot record the lease length: {0}")]
    LeaseNotRecorded(String),
    /// The voter's applied state does not let it grant.
    #[error(transparent)]
    Grant(#[from] GrantRefusal),
    /// A node asked to record a report, fence or count about another.
    #[error(
        "a node records only moves, declarations, and reports, fences and counts about itself"
    )]
    NotItsOwn,
    /// Only the leader writes to the log.
    #[error("not the leader")]
    NotLeader,
    /// Written, but the state machine did not apply it (another epoch by
    /// now, or already so: [`Response::Stale`]).
    #[error("not applied: {0:?}")]
    NotApplied(Response),
    /// The log write failed.
    #[error("cannot write to the cluster log: {0}")]
    LogWrite(String),
}

/// Why a voter would not grant a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum GrantRefusal {
    /// It has not applied the group's assignment yet.
    #[error("no such group here yet")]
    UnknownGroup,
    /// It sees another epoch or owner.
    #[error("at epoch {epoch} with owner {owner:?} here")]
    OtherOwner {
        /// The epoch it applied.
        epoch: u64,
        /// The owner it applied.
        owner: Option<NodeId>,
    },
    /// The epoch was revoked or released.
    #[error("that epoch is over")]
    EpochOver,
}
