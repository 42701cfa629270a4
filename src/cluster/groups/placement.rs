//! Where groups go — the leader's decisions, without I/O.
//!
//! A group is placed on the first live member of its preferred nodes, else
//! on the live member with the fewest groups; witnesses never. It moves
//! only when its owner is down, gone, left, fenced or failed, when an
//! operator asks, or (with `failback`) when a more preferred node is live
//! again. A failed owner's epoch is revoked, and the next one assigned
//! once every grant has run out; a healthy owner that should move is asked
//! to drain and hand over — it releases the epoch itself, under a lease
//! that stays live meanwhile — and the next epoch is assigned then. A
//! handover that has not ended well past the time it may take (its
//! release lost, say, while the leader changed) is revoked, so a group is
//! never left waiting on it for ever.
//!
//! A member's delivery group goes to that member only, whatever else it
//! is doing (draining included: a draining node still delivers its
//! queue). Taken back from it, the group is left unowned — the epoch that
//! records its shadows taken over — until it is up again.

use std::collections::BTreeMap;

use crate::cluster::state::groups::{delivery_node, GroupState, GroupStatus};
use crate::cluster::state::{ClusterState, NodeId, NodeState, Role};

/// What the leader knows of a group from configuration.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The group's name.
    pub name: &'a str,
    /// Node names in order of preference.
    pub preferred: &'a [String],
    /// Move back to a more preferred node when it is live again.
    pub failback: bool,
    /// How long a handover may take, its lease included, in ms.
    pub handover_ms: u64,
    /// The leader's clock now (ms since the epoch).
    pub now_ms: u64,
}

/// What to do about one group now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Leave it as it is.
    Keep,
    /// Start the next epoch with this owner.
    Assign {
        /// The new owner.
        owner: NodeId,
        /// Why, for operators.
        reason: String,
    },
    /// Start the next epoch with no owner (a fenced member's delivery
    /// group, whose epoch must end for its shadows to be taken over).
    Unplace {
        /// Why.
        reason: String,
    },
    /// Take the current epoch back from its owner.
    Revoke {
        /// Why.
        reason: String,
    },
    /// Ask the (healthy) owner to drain and hand the group over.
    Drain {
        /// Why.
        reason: String,
    },
    /// Revoked, not released: ask the voters until every grant has
    /// certainly run out, then decide again with `free`.
    AwaitGrants,
}

/// Decide for `p`'s group given the replicated state; `free` says the
/// voters' grants for a revoked epoch have certainly run out.
pub fn decide(p: Policy<'_>, state: &ClusterState, free: bool) -> Decision {
    let g = state.groups.get(p.name).cloned().unwrap_or_default();
    if let Some(node) = delivery_node(p.name) {
        return delivery(state, &g, free, node);
    }
    let Some(owner) = g.owner else {
        return match best(p, state, &g, None) {
            Some(n) => Decision::Assign {
                owner: n,
                reason: format!("placed on {}", name(state, n)),
            },
            None => Decision::Keep,
        };
    };
    if g.revoked || g.released {
        if !g.released && !free {
            return Decision::AwaitGrants;
        }
        // A node whose resources failed is not given the group straight back.
        let avoid = (g.status == GroupStatus::Failed).then_some(owner);
        return match best(p, state, &g, avoid) {
            Some(n) => Decision::Assign {
                owner: n,
                reason: format!("{}; now on {}", g.reason, name(state, n)),
            },
            None => Decision::Keep,
        };
    }
    let revoke = |reason: String| Decision::Revoke { reason };
    let Some(m) = state.members.get(&owner) else {
        return revoke(format!("owner {owner:x} is no longer a member"));
    };
    let who = &m.member.name;
    match m.state {
        NodeState::Down => return revoke(format!("owner {who} is down")),
        NodeState::Left => return revoke(format!("owner {who} left")),
        NodeState::Up | NodeState::Suspect => {}
    }
    if m.member.role == Role::Witness {
        return revoke(format!("owner {who} is a witness"));
    }
    if g.fenced.contains(&owner) {
        return revoke(format!("owner {who} is fenced"));
    }
    if g.draining {
        // Asked already: the owner releases when its sessions are done —
        // unless that is long overdue (twice the time it may take).
        let overdue = g.draining_since_ms.saturating_add(2 * p.handover_ms);
        if p.now_ms > overdue {
            return revoke(format!("owner {who} did not finish handing over in time"));
        }
        return Decision::Keep;
    }
    let drain = |reason: String| Decision::Drain { reason };
    // An operator drains the owner: hand over, if anyone can take it.
    if state.draining.contains(&owner) && best(p, state, &g, Some(owner)).is_some() {
        return drain(format!("owner {who} is draining"));
    }
    if let Some(to) = g.move_to.filter(|t| *t != owner) {
        if eligible(state, &g, to) {
            return drain(format!("moving to {} on request", name(state, to)));
        }
    }
    if p.failback {
        if let Some(better) = preferred_live(p, state, &g).filter(|b| *b != owner) {
            let rank = |id| p.preferred.iter().position(|n| *n == name(state, id));
            if rank(better) < rank(owner) || rank(owner).is_none() {
                return drain(format!("failing back to {}", name(state, better)));
            }
        }
    }
    Decision::Keep
}

/// Decide for the delivery group `g` of the member called `node`.
fn delivery(state: &ClusterState, g: &GroupState, free: bool, node: &str) -> Decision {
    let live = state
        .members
        .iter()
        .find(|(_, m)| m.member.name == node && m.state == NodeState::Up)
        .filter(|(_, m)| m.member.role == Role::Member)
        .map(|(id, _)| *id);
    let assign = |owner: NodeId| Decision::Assign {
        owner,
        reason: format!("{node} delivers"),
    };
    let Some(owner) = g.owner else {
        return live.map_or(Decision::Keep, assign);
    };
    if g.revoked || g.released {
        if g.revoked && !g.released && !free {
            return Decision::AwaitGrants;
        }
        return match live {
            Some(n) => assign(n),
            // Certainly stopped: end the epoch, and with it take its
            // shadows over (see `GroupCommand::Assign`).
            None if g.revoked => Decision::Unplace {
                reason: format!("{node} is fenced: its shadow copies are taken over"),
            },
            None if !state.members.contains_key(&owner) => Decision::Revoke {
                reason: format!("{node} is no longer a member"),
            },
            None => Decision::Keep,
        };
    }
    match state.members.get(&owner).map(|m| m.state) {
        None => Decision::Revoke {
            reason: format!("{node} ({owner:x}) is no longer a member"),
        },
        Some(NodeState::Down) => Decision::Revoke {
            reason: format!("{node} is down"),
        },
        Some(NodeState::Left) => Decision::Revoke {
            reason: format!("{node} left"),
        },
        Some(NodeState::Up | NodeState::Suspect) => Decision::Keep,
    }
}

/// The node to place the group on: a requested destination if it can
/// take it, else the first live preferred node, else the live member with
/// the fewest groups (then the lowest name).
fn best(
    p: Policy<'_>,
    state: &ClusterState,
    g: &GroupState,
    avoid: Option<NodeId>,
) -> Option<NodeId> {
    let ok = |id: NodeId| Some(id) != avoid && eligible(state, g, id);
    if let Some(to) = g.move_to.filter(|t| ok(*t)) {
        return Some(to);
    }
    if let Some(n) = preferred_live(p, state, g).filter(|n| ok(*n)) {
        return Some(n);
    }
    let load = |id: NodeId| {
        state
            .groups
            .values()
            .filter(|o| o.owner == Some(id) && !o.released)
            .count()
    };
    state
        .members
        .keys()
        .copied()
        .filter(|id| ok(*id))
        .min_by_key(|id| (load(*id), name(state, *id)))
}

fn preferred_live(p: Policy<'_>, state: &ClusterState, g: &GroupState) -> Option<NodeId> {
    p.preferred.iter().find_map(|want| {
        state
            .members
            .iter()
            .find(|(id, m)| m.member.name == *want && eligible(state, g, **id))
            .map(|(id, _)| *id)
    })
}

/// A live full member that is not fenced for the group nor draining.
fn eligible(state: &ClusterState, g: &GroupState, id: NodeId) -> bool {
    state.members.get(&id).is_some_and(|m| {
        m.state == NodeState::Up
            && m.member.role == Role::Member
            && !g.fenced.contains(&id)
            && !state.draining.contains(&id)
    })
}

fn name(state: &ClusterState, id: NodeId) -> String {
    state
        .members
        .get(&id)
        .map_or_else(|| format!("{id:x}"), |m| m.member.name.clone())
}

/// Groups each node owns now (not released), for `ctl` and tests; not
/// the members' delivery groups.
pub fn owned(state: &ClusterState) -> BTreeMap<NodeId, Vec<String>> {
    let mut out: BTreeMap<NodeId, Vec<String>> = BTreeMap::new();
    let groups = state.groups.iter();
    for (name, g) in groups.filter(|(n, _)| delivery_node(n).is_none()) {
        if let (Some(o), false) = (g.owner, g.released) {
            out.entry(o).or_default().push(name.clone());
        }
    }
    out
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
