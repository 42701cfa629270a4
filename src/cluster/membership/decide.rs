//! Membership decisions, without I/O: when a fresh node bootstraps a
//! cluster or joins one, how a leader admits a joiner (including one that
//! comes back with a wiped disk), and the retry backoff. The drivers ask
//! these functions and carry out the answer with links and openraft.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::cluster::rpc::JoinRequest;
use crate::cluster::state::{Member, NodeId};

/// What a seed said when a fresh node asked for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeedView {
    /// No answer (refused, timed out, failed the handshake).
    Unreachable,
    /// A node with no cluster state yet, with its name.
    Fresh {
        /// Its configured name.
        name: String,
    },
    /// A member of an initialized cluster (it forwards joins to the leader).
    Member,
}

/// What a fresh node does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Ask this node to admit us.
    Join(SocketAddr),
    /// Initialize a new cluster with ourselves as its only voter; the
    /// other fresh seeds will join it.
    Bootstrap,
    /// Nothing decisive yet: ask again after a backoff.
    Wait,
}

/// Decide how a node without cluster state starts, from its seeds' views.
///
/// A node bootstraps only when every seed answered and is fresh too, and
/// its own name is the lowest of them all. Then every node of the initial
/// set sees the same names, so exactly one bootstraps, whatever the
/// timing; the others join it. A majority rule would not do: two nodes
/// with different partial views can each be the lowest of a different
/// majority and start two clusters. Seeds should therefore list the same
/// initial members on every node; a seed that is down at the first start
/// delays forming the cluster rather than risking two.
pub fn start(me: &str, seeds: &[(SocketAddr, SeedView)]) -> Start {
    // Join through the member that answered: it forwards to the leader,
    // so the joiner needs a path to one member only.
    for (addr, view) in seeds {
        if *view == SeedView::Member {
            return Start::Join(*addr);
        }
    }
    let mut lowest = true;
    for (_, view) in seeds {
        match view {
            SeedView::Fresh { name } => lowest &= me < name.as_str(),
            _ => return Start::Wait,
        }
    }
    if lowest {
        Start::Bootstrap
    } else {
        Start::Wait
    }
}

/// A known member, as the leader sees it for admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The member record.
    pub member: Member,
    /// Whether it is in the voter set.
    pub voter: bool,
}

/// One step of admitting a node, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Take a stale incarnation out of the voter set (and learners).
    RemoveNode(NodeId),
    /// Forget the stale incarnation's member record.
    Forget(NodeId),
    /// Record the joiner's member record.
    Record(NodeId, Member),
    /// Add it as a learner and wait until it has caught up (bounded by
    /// the join timeout; on timeout the learner is removed again).
    AddLearner(NodeId, Member),
}

/// The leader's decision on a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Carry out these steps, then answer Admitted { voter }.
    Steps {
        /// The steps.
        steps: Vec<Step>,
        /// Whether a voter slot is free for it: the failure detector
        /// promotes it once it is caught up and up.
        voter: bool,
    },
    /// Refuse with this reason.
    Refuse(String),
}

/// How a leader admits `req`, given the cluster's members and the voter
/// limit. Admission makes a member a learner, never a voter: promotion is
/// the failure detector's alone ([`super::detector::promotion`]), so two
/// deciders can never fill the same free slot twice. Admission is
/// idempotent: a joiner whose connection was cut after it was admitted
/// asks again and gets the same answer with no new steps beyond the ones
/// still missing.
pub fn admit(known: &BTreeMap<NodeId, Known>, req: &JoinRequest, max_voters: usize) -> Admission {
    let member = Member {
        name: req.name.clone(),
        addr: req.addr.to_string(),
        role: req.role,
    };
    let mut steps = Vec::new();
    let same_name: Vec<(&NodeId, &Known)> = known
        .iter()
        .filter(|(_, k)| k.member.name == req.name)
        .collect();
    for (&id, _) in &same_name {
        if id > req.incarnation {
            return Admission::Refuse(format!(
                "{} is already a member with the newer incarnation {id}; \
                 this node's data dir ({}) is older — wipe it to rejoin",
                req.name, req.incarnation
            ));
        }
    }
    let voters_now = known.values().filter(|k| k.voter).count();
    if let Some(me) = known.get(&req.incarnation) {
        // Rejoining with the same incarnation: it keeps its place; only a
        // changed address needs recording.
        if me.member != member {
            steps.push(Step::Record(req.incarnation, member));
        }
        return Admission::Steps {
            steps,
            voter: me.voter || voters_now < max_voters,
        };
    }
    let mut stale_voters = 0;
    for (&id, k) in same_name {
        // An older incarnation of the same name: the node came back with a
        // wiped disk. It leaves the voter set before the new one enters,
        // so the quorum never counts a node twice.
        steps.push(Step::RemoveNode(id));
        steps.push(Step::Forget(id));
        stale_voters += usize::from(k.voter);
    }
    steps.push(Step::Record(req.incarnation, member.clone()));
    steps.push(Step::AddLearner(req.incarnation, member));
    Admission::Steps {
        steps,
        voter: voters_now - stale_voters < max_voters,
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
