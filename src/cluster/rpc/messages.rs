//! The requests nodes send each other over an authenticated link, and
//! their replies: raft's three RPCs plus the membership calls. A link
//! carries them as `LinkMessage::App` bodies, wrapped in an `Envelope`
//! that pairs each reply with its request.

use std::net::SocketAddr;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::cluster::rpc::group::{GroupReply, GroupRequest};
use crate::cluster::rpc::shadow::{ShadowReply, ShadowRequest};
use crate::cluster::state::{NodeId, Role, TypeConfig};

/// What travels in a link's `App` body.
#[derive(Debug, Serialize, Deserialize)]
pub enum Envelope {
    /// A call; the peer answers with a `Reply` carrying the same `id`.
    Call {
        /// Chosen by the caller, unique per link.
        id: u64,
        /// The request.
        request: Request,
    },
    /// The answer to call `id`.
    Reply {
        /// The call's id.
        id: u64,
        /// The answer.
        reply: Reply,
    },
}

/// A call from one node to another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// raft: replicate entries / heartbeat.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// raft: ask for a vote.
    Vote(VoteRequest<NodeId>),
    /// raft: a snapshot chunk.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// membership: admit the caller (sent to any member; forwarded to the
    /// leader by a follower).
    Join(JoinRequest),
    /// membership: what the callee knows, for joiners and bootstrap.
    Status,
    /// membership: the caller is stopping on purpose; the leader records
    /// it as left (a node may announce only its own leave).
    Leave,
    /// resource groups: grants, outstanding grants, owners' reports.
    Group(GroupRequest),
    /// shadow copies: a primary's copies of its messages and their
    /// progress.
    Shadow(ShadowRequest),
}

/// The answer to a `Request`, variant for variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// To `AppendEntries`.
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To `InstallSnapshot`.
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// To `Join`.
    Join(JoinReply),
    /// To `Status`.
    Status(StatusReply),
    /// To `Leave`: recorded.
    Left,
    /// To `Group`.
    Group(GroupReply),
    /// To `Shadow`.
    Shadow(ShadowReply),
    /// The callee could not handle the request at all (e.g. raft not
    /// running yet); the text says why.
    Unavailable(String),
}

/// A node asking to be admitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// Its configured name.
    pub name: String,
    /// Its incarnation, which is also its raft node id.
    pub incarnation: NodeId,
    /// Where it accepts cluster links.
    pub addr: SocketAddr,
    /// Member or witness.
    pub role: Role,
    /// How many times its data directory has started (0: not counted).
    #[serde(default)]
    pub generation: u64,
    /// Random for each start: the same start asking again is not a copy.
    #[serde(default)]
    pub start: u64,
}

/// The answer to a join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinReply {
    /// Admitted: as a voter, or as a non-voting member when the voter set
    /// is full.
    Admitted {
        /// Whether it votes.
        voter: bool,
    },
    /// Not now (no leader, a membership change in progress); try again.
    Retry {
        /// Why.
        reason: String,
    },
    /// Never with this request (e.g. the name belongs to a live node with
    /// another incarnation that is not older); the reason is logged.
    Refused {
        /// Why.
        reason: String,
    },
    /// Never: its data directory is older than one this incarnation has
    /// already run with (restored from a copy); its raft vote and log may
    /// be older than what it promised. It must stop taking part.
    Restored {
        /// The generation it came with.
        generation: u64,
        /// The highest the cluster has seen for its incarnation.
        seen: u64,
    },
}

/// What a node says about itself and its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// Its name.
    pub name: String,
    /// Its incarnation.
    pub incarnation: NodeId,
    /// Whether it belongs to an initialized cluster.
    pub initialized: bool,
    /// The leader it knows of, with its cluster address.
    pub leader: Option<(NodeId, SocketAddr)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_through_json() {
        let call = Envelope::Call {
            id: 7,
            request: Request::Join(JoinRequest {
                name: "node-d".into(),
                incarnation: 42,
                addr: "127.0.0.14:7400".parse().unwrap(),
                role: Role::Member,
                generation: 0,
                start: 0,
            }),
        };
        let text = serde_json::to_value(&call).unwrap();
        let back: Envelope = serde_json::from_value(text).unwrap();
        match back {
            Envelope::Call {
                id: 7,
                request: Request::Join(j),
            } => assert_eq!(j.name, "node-d"),
            other => panic!("{other:?}"),
        }
        let reply = Envelope::Reply {
            id: 7,
            reply: Reply::Join(JoinReply::Admitted { voter: true }),
        };
        let back: Envelope = serde_json::from_value(serde_json::to_value(&reply).unwrap()).unwrap();
        assert!(matches!(
            back,
            Envelope::Reply {
                id: 7,
                reply: Reply::Join(JoinReply::Admitted { voter: true })
            }
        ));
    }
}
