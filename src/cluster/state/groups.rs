//! Resource groups in the replicated state: who owns each group under
//! which fencing epoch, and the commands that move it. Applying is pure and
//! deterministic, like the rest of [`super::types::ClusterState`].
//!
//! The life of one epoch: the leader assigns the group to a node under
//! the next epoch; the owner collects grants from a majority of voters and brings
//! its resources online; to take it back the leader revokes the epoch
//! (voters grant no more for it); the epoch ends when the owner reports
//! that it stopped (released), or when every grant has certainly run out.
//! Only then is the next epoch assigned.
//!
//! Every full member also has a *delivery group*, `delivery@<name>`, that
//! only it may own and that holds no resources: a clustered node delivers
//! mail only while it holds that group's lease. When the cluster takes
//! the epoch back from a failed member and every grant has run out, the
//! member has certainly stopped delivering, and the assignment that ends
//! the epoch records that its shadow copies are taken over (`promoted`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{NodeId, Response};

/// The state of a group's resources as its owner last reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupStatus {
    /// Not running (nobody started it yet under this epoch).
    #[default]
    Offline,
    /// Starting on its owner.
    Starting,
    /// Serving on its owner.
    Online,
    /// Stopping on its owner.
    Stopping,
    /// Its owner gave up after restarts in place failed.
    Failed,
}

impl fmt::Display for GroupStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupStatus::Offline => "offline",
            GroupStatus::Starting => "starting",
            GroupStatus::Online => "online",
            GroupStatus::Stopping => "stopping",
            GroupStatus::Failed => "failed",
        })
    }
}

/// One group as the cluster records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// The node that owns it under `epoch`; None: not placed.
    pub owner: Option<NodeId>,
    /// Fencing epoch, raised by every assignment.
    pub epoch: u64,
    /// The leader took the epoch back: voters grant nothing more for it.
    pub revoked: bool,
    /// The owner stopped and will not start again under this epoch: the
    /// next one may be assigned without waiting for grants to run out.
    pub released: bool,
    /// What the owner last reported.
    pub status: GroupStatus,
    /// The leader asked the owner to hand the group over: it drains (new
    /// clients get 421, open sessions finish) under its still-live lease,
    /// then releases the epoch. Not a revoke: voters keep granting, so
    /// nobody else can start it while the drain lasts.
    #[serde(default)]
    pub draining: bool,
    /// When the leader asked for the handover (its clock, ms).
    #[serde(default)]
    pub draining_since_ms: u64,
    /// Where an operator asked it to go.
    pub move_to: Option<NodeId>,
    /// Preferred node names, as the last member to declare the group
    /// configured them: what a leader that does not define the group
    /// itself (a witness) places it by.
    #[serde(default)]
    pub preferred: Vec<String>,
    /// Whether it moves back to a more preferred node, likewise.
    #[serde(default)]
    pub failback: bool,
    /// Its lease in ms, likewise (0: not declared).
    #[serde(default)]
    pub lease_ms: u64,
    /// How long a handover may take on its owner (drain and stop
    /// timeouts), in ms, likewise (0: not declared).
    #[serde(default)]
    pub handover_ms: u64,
    /// The log index of the oldest membership the owner may count its
    /// lease in (see [`super::history`]).
    #[serde(default)]
    pub counted_since: u64,
    /// Epochs taken back from a failed or unreachable owner (not handed
    /// over gracefully).
    #[serde(default)]
    pub failovers: u64,
    /// Nodes where a stop failed: the group is never placed there again
    /// until they come back clean.
    pub fenced: BTreeSet<NodeId>,
    /// When the last transition happened (ms since the epoch).
    pub since_ms: u64,
    /// Why.
    pub reason: String,
    /// A delivery group only: members whose shadow copies were taken
    /// over (see [`delivery_node`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub promoted: BTreeMap<NodeId, Promotion>,
}

/// The takeover of a fenced member's shadow copies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// The last delivery epoch it held.
    pub epoch: u64,
    /// The members that take over the copies they hold: those up when it
    /// was fenced. Its own messages that one of them holds copies of are
    /// theirs now; the rest stay its own.
    pub takers: BTreeSet<NodeId>,
}

/// What the name of a member's delivery group starts with; `@` is not
/// allowed in configured group names, so the two never meet.
const DELIVERY: &str = "delivery@";

/// The name of the delivery group of the member called `node`.
pub fn delivery_group(node: &str) -> String {
    format!("{DELIVERY}{node}")
}

/// The member whose delivery group `group` is; None for other groups.
pub fn delivery_node(group: &str) -> Option<&str> {
    group.strip_prefix(DELIVERY)
}

/// A change to one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Not tagged "op": it rides inside `Command`, whose tag that is.
#[serde(tag = "change", rename_all = "snake_case")]
pub enum GroupCommand {
    /// Start epoch `epoch` (exactly one above the current) with this
    /// owner (None: unplaced).
    Assign {
        /// The group.
        group: String,
        /// The new epoch.
        epoch: u64,
        /// Its owner.
        owner: Option<NodeId>,
        /// Why, for operators.
        reason: String,
        /// When (leader's clock).
        at_ms: u64,
        /// A delivery group taken from a fenced member: who takes over
        /// its shadow copies (see [`Promotion`]).
        #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
        takers: BTreeSet<NodeId>,
    },
    /// Take epoch `epoch` back from its owner.
    Revoke {
        /// The group.
        group: String,
        /// The epoch being taken back.
        epoch: u64,
        /// Why.
        reason: String,
        /// When.
        at_ms: u64,
    },
    /// Ask the owner of epoch `epoch` to hand the group over gracefully.
    Drain {
        /// The group.
        group: String,
        /// The epoch to hand over.
        epoch: u64,
        /// Why.
        reason: String,
        /// When.
        at_ms: u64,
    },
    /// The owner reports its resources' status; Offline and Failed mean
    /// it stopped for good under this epoch (released).
    Report {
        /// The group.
        group: String,
        /// The epoch it reports for.
        epoch: u64,
        /// The reporting node, which must be the owner.
        node: NodeId,
        /// Its status.
        status: GroupStatus,
        /// Why, for operators.
        reason: String,
        /// When.
        at_ms: u64,
    },
    /// The owner of `epoch` has applied the membership at log index
    /// `since`: it no longer counts its lease in older ones.
    Counting {
        /// The group.
        group: String,
        /// The owner's epoch.
        epoch: u64,
        /// The owner.
        node: NodeId,
        /// The membership's log index.
        since: u64,
    },
    /// An operator asks for the group on `to` (None: cancel).
    Move {
        /// The group.
        group: String,
        /// The destination.
        to: Option<NodeId>,
        /// When.
        at_ms: u64,
    },
    /// A member defines the group in its configuration like this: known
    /// to every leader from then on, even one that does not define it.
    Declare {
        /// The group.
        group: String,
        /// Preferred node names, in order.
        preferred: Vec<String>,
        /// Move back to a more preferred node.
        failback: bool,
        /// The lease owners ask for, in ms.
        #[serde(default)]
        lease_ms: u64,
        /// How long a handover may take (drain and stop timeouts), in ms.
        #[serde(default)]
        handover_ms: u64,
    },
    /// Keep the group off `node` (a stop failed there), or allow it again.
    Fence {
        /// The group.
        group: String,
        /// The node.
        node: NodeId,
        /// True to fence, false to lift it.
        fenced: bool,
        /// Why.
        reason: String,
        /// When.
        at_ms: u64,
    },
}

impl GroupCommand {
    /// The group it changes.
    pub fn group(&self) -> &str {
        match self {
            GroupCommand::Assign { group, .. }
            | GroupCommand::Revoke { group, .. }
            | GroupCommand::Drain { group, .. }
            | GroupCommand::Report { group, .. }
            | GroupCommand::Counting { group, .. }
            | GroupCommand::Move { group, .. }
            | GroupCommand::Declare { group, .. }
            | GroupCommand::Fence { group, .. } => group,
        }
    }

    /// Whether it may bring a group into the state.
    pub fn creates(&self) -> bool {
        matches!(
            self,
            GroupCommand::Assign { .. } | GroupCommand::Declare { .. }
        )
    }

    /// Applies to the group's state (a default one if it is new).
    /// Commands for another epoch than they expect change nothing: an
    /// owner's late report or a leader's decision on an older view cannot
    /// undo a newer epoch.
    pub fn apply(&self, g: &mut GroupState) -> Response {
        match self {
            GroupCommand::Assign {
                group,
                epoch,
                owner,
                reason,
                at_ms,
                takers,
            } => {
                // Never over a live epoch: only after a revoke or a release
                // (or onto an unplaced group) — whatever a stale leader saw.
                let live = g.owner.is_some() && !g.revoked && !g.released;
                if *epoch != g.epoch + 1 || live {
                    return Response::Stale;
                }
                // A member's delivery epoch taken back and not given back
                // to it: it delivers no more, its shadows are taken over.
                if let (Some(old), true) = (g.owner, g.revoked) {
                    if delivery_node(group).is_some() && *owner != Some(old) {
                        let takers = takers.clone();
                        let epoch = g.epoch;
                        g.promoted.insert(old, Promotion { epoch, takers });
                    }
                }
                if g.owner.is_some() && g.revoked && !g.released {
                    g.failovers += 1;
                }
                g.owner = *owner;
                g.epoch = *epoch;
                g.revoked = false;
                g.released = false;
                g.draining = false;
                g.status = GroupStatus::Offline;
                if g.move_to.is_some() && g.move_to == *owner {
                    g.move_to = None;
                }
                transition(g, reason, *at_ms);
            }
            GroupCommand::Revoke {
                epoch,
                reason,
                at_ms,
                ..
            } => {
                if *epoch != g.epoch || g.owner.is_none() || g.revoked {
                    return Response::Stale;
                }
                g.revoked = true;
                transition(g, reason, *at_ms);
            }
            GroupCommand::Drain {
                epoch,
                reason,
                at_ms,
                ..
            } => {
                let live = g.owner.is_some() && !g.revoked && !g.released;
                if *epoch != g.epoch || !live || g.draining {
                    return Response::Stale;
                }
                g.draining = true;
                g.draining_since_ms = *at_ms;
                transition(g, reason, *at_ms);
            }
            GroupCommand::Report {
                epoch,
                node,
                status,
                reason,
                at_ms,
                ..
            } => {
                if *epoch != g.epoch || g.owner != Some(*node) || g.released {
                    return Response::Stale;
                }
                g.status = *status;
                g.released = matches!(status, GroupStatus::Offline | GroupStatus::Failed);
                transition(g, reason, *at_ms);
            }
            GroupCommand::Counting {
                epoch, node, since, ..
            } => {
                let current = *epoch == g.epoch && g.owner == Some(*node) && !g.released;
                if !current || *since <= g.counted_since {
                    return Response::Stale;
                }
                g.counted_since = *since;
            }
            GroupCommand::Move { to, at_ms, .. } => {
                g.move_to = *to;
                let why = match to {
                    Some(n) => format!("move to {n:x} requested"),
                    None => "move cancelled".to_string(),
                };
                transition(g, &why, *at_ms);
            }
            GroupCommand::Declare {
                preferred,
                failback,
                lease_ms,
                handover_ms,
                ..
            } => {
                let same = g.preferred == *preferred && g.failback == *failback;
                if same && g.lease_ms == *lease_ms && g.handover_ms == *handover_ms {
                    return Response::Stale;
                }
                g.preferred = preferred.clone();
                g.failback = *failback;
                g.lease_ms = *lease_ms;
                g.handover_ms = *handover_ms;
            }
            GroupCommand::Fence {
                node,
                fenced,
                reason,
                at_ms,
                ..
            } => {
                let changed = if *fenced {
                    g.fenced.insert(*node)
                } else {
                    g.fenced.remove(node)
                };
                if !changed {
                    return Response::Stale;
                }
                transition(g, reason, *at_ms);
            }
        }
        Response::Done
    }
}

fn transition(g: &mut GroupState, reason: &str, at_ms: u64) {
    g.since_ms = at_ms;
    g.reason = reason.to_string();
}

#[cfg(test)]
#[path = "groups_tests.rs"]
mod tests;
