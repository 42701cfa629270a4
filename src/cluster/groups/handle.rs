//! What the group code and the admin API need of the cluster: this node,
//! the replicated state, the voters, calls to any member (answered locally
//! when the member is this node), each with a deadline, and the operator's
//! actions (drain, move, evict) with typed refusals.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use tokio::sync::watch;

use super::service::GroupService;
use crate::cluster::identity::Identity;
use crate::cluster::link::LinkConfig;
use crate::cluster::membership::admit;
use crate::cluster::raft::store::ClusterView;
use crate::cluster::rpc::group::{GroupReply, GroupRequest, Refusal};
use crate::cluster::rpc::peer::{PeerClient, PeerClients};
use crate::cluster::rpc::{Reply, Request};
use crate::cluster::state::groups::GroupCommand;
use crate::cluster::state::{NodeId, Response, TypeConfig};

/// Why an operator's action was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The name is no member's.
    #[error("no member named {0}")]
    NoSuchMember(String),
    /// Membership changes are made by the leader's admin API.
    #[error("not the leader: ask the leader's admin API")]
    NotLeader,
    /// Evicting itself would leave the cluster leaderless mid-change.
    #[error("a leader does not evict itself")]
    EvictSelf,
    /// The leader could not be reached or did not take it.
    #[error("the leader did not take it: {0}")]
    Unavailable(String),
    /// The change failed.
    #[error("{0}")]
    Failed(String),
    /// The change was not committed within the deadline.
    #[error("the cluster did not commit the change in time")]
    TimedOut,
}

/// A cheap-to-clone handle on the running cluster side.
#[derive(Clone)]
pub struct ClusterHandle {
    /// This node.
    pub me: Identity,
    /// The raft handle (metrics: leader, voters).
    pub raft: Raft<TypeConfig>,
    /// The replicated state as applied here.
    pub view: watch::Receiver<ClusterView>,
    local: Arc<GroupService>,
    clients: PeerClients,
}

impl ClusterHandle {
    /// A handle over these parts.
    pub fn new(
        me: Identity,
        raft: Raft<TypeConfig>,
        view: watch::Receiver<ClusterView>,
        link: LinkConfig,
        local: Arc<GroupService>,
    ) -> ClusterHandle {
        ClusterHandle {
            me,
            raft,
            view,
            local,
            clients: PeerClients::new(link),
        }
    }

    /// Every voter configuration in force (two during a membership change).
    pub fn voter_configs(&self) -> Vec<BTreeSet<NodeId>> {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config
            .membership()
            .get_joint_config()
            .iter()
            .map(|c| c.iter().copied().collect())
            .collect()
    }

    /// Every voter configuration the owner of `group` may still count
    /// its lease in: those since its recorded membership and those in
    /// force here (see [`crate::cluster::state::history`]). A majority of each must
    /// answer before a revoked group is free.
    pub fn lease_configs(&self, group: &str) -> Vec<BTreeSet<NodeId>> {
        let since = {
            let v = self.view.borrow();
            v.state.groups.get(group).map_or(0, |g| g.counted_since)
        };
        self.configs_since(since)
    }

    /// The voter configurations an owner counts its lease in: those of
    /// the memberships applied since the one current at log index `since`
    /// — committed, so every leader counts them too — never one merely
    /// appended here, which a new leader may not have.
    pub fn applied_configs_since(&self, since: u64) -> Vec<BTreeSet<NodeId>> {
        let applied = self.view.borrow().state.voters.since(since);
        match applied.is_empty() {
            // A state from before the history was kept.
            true => self.voter_configs(),
            false => applied,
        }
    }

    /// Whether this node has applied every membership in its log: until
    /// then its history may miss one an owner counts in, and no revoked
    /// group may be freed.
    pub fn membership_applied(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        let effective = m.membership_config.log_id().map_or(0, |l| l.index);
        let last = self.view.borrow().state.voters.last();
        // 0: a state from before the history was kept; nothing to wait for.
        last == 0 || last >= effective
    }

    /// The voter configurations applied since the membership current at
    /// log index `since`, and those in force here.
    pub fn configs_since(&self, since: u64) -> Vec<BTreeSet<NodeId>> {
        let mut configs = self.view.borrow().state.voters.since(since);
        for c in self.voter_configs() {
            if !configs.contains(&c) {
                configs.push(c);
            }
        }
        configs
    }

    /// The leader, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// True while this node leads.
    pub fn leads(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader == Some(m.id)
    }

    /// Make a group call on member `id`, bounded by `timeout`.
    pub async fn call(
        &self,
        id: NodeId,
        req: GroupRequest,
        timeout: Duration,
    ) -> Result<GroupReply, String> {
        if id == self.me.incarnation {
            return Ok(self.local.handle(&self.me, req).await);
        }
        let client = self.client(id)?;
        match client.call(Request::Group(req), timeout).await {
            Ok(Reply::Group(r)) => Ok(r),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Make a group call on the leader.
    pub async fn to_leader(
        &self,
        req: GroupRequest,
        timeout: Duration,
    ) -> Result<GroupReply, String> {
        let leader = self.leader().ok_or("no leader known")?;
        self.call(leader, req, timeout).await
    }

    /// One reusable client per member; a new one when its address changes.
    fn client(&self, id: NodeId) -> Result<PeerClient, String> {
        let m = self.raft.metrics().borrow().clone();
        let addr: SocketAddr = m
            .membership_config
            .membership()
            .get_node(&id)
            .ok_or_else(|| format!("{id:x} is not a member"))?
            .addr
            .parse()
            .map_err(|e| format!("address of {id:x}: {e}"))?;
        Ok(self.clients.get(id, addr))
    }

    /// The member called `name`, by the replicated state.
    pub fn member(&self, name: &str) -> Result<NodeId, ActionError> {
        let v = self.view.borrow();
        v.state
            .by_name(name)
            .map(|(id, _)| id)
            .ok_or_else(|| ActionError::NoSuchMember(name.to_string()))
    }

    /// Drain the member `name` (or end its drain), through the leader.
    pub async fn set_drain(
        &self,
        name: &str,
        draining: bool,
        timeout: Duration,
    ) -> Result<(), ActionError> {
        let node = self.member(name)?;
        let req = GroupRequest::SetDrain { node, draining };
        match self.to_leader(req, timeout).await {
            // Stale: already so.
            Ok(GroupReply::Recorded)
            | Ok(GroupReply::Refused(Refusal::NotApplied(Response::Stale))) => Ok(()),
            other => Err(not_taken(other)),
        }
    }

    /// Move `group` to the member `name`, through the leader; `at_ms` is
    /// the wall-clock time of the request, for the record.
    pub async fn move_group(
        &self,
        group: &str,
        name: &str,
        at_ms: u64,
        timeout: Duration,
    ) -> Result<(), ActionError> {
        let to = self.member(name)?;
        let cmd = GroupCommand::Move {
            group: group.to_string(),
            to: Some(to),
            at_ms,
        };
        match self.to_leader(GroupRequest::Record(cmd), timeout).await {
            Ok(GroupReply::Recorded) => Ok(()),
            other => Err(not_taken(other)),
        }
    }

    /// Take the member `name` out of the cluster; only the leader does.
    pub async fn evict(&self, name: &str, timeout: Duration) -> Result<(), ActionError> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(m.id) {
            return Err(ActionError::NotLeader);
        }
        let id = m
            .membership_config
            .membership()
            .nodes()
            .find(|(_, n)| n.name == name)
            .map(|(id, _)| *id)
            .ok_or_else(|| ActionError::NoSuchMember(name.to_string()))?;
        if id == m.id {
            return Err(ActionError::EvictSelf);
        }
        match tokio::time::timeout(timeout, admit::evict(&self.raft, id)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ActionError::Failed(e)),
            Err(_) => Err(ActionError::TimedOut),
        }
    }
}

/// Why the leader did not take an operator's request, in words for the
/// operator (a refusal says why; the rest cannot happen in practice).
fn not_taken(answer: Result<GroupReply, String>) -> ActionError {
    ActionError::Unavailable(match answer {
        Ok(GroupReply::Refused(why)) => why.to_string(),
        Ok(other) => format!("unexpected answer {other:?}"),
        Err(e) => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reaches_the_operator_in_words() {
        let e = not_taken(Ok(GroupReply::Refused(Refusal::NotLeader)));
        assert_eq!(e.to_string(), "the leader did not take it: not the leader");
        let e = not_taken(Err("no leader known".into()));
        assert_eq!(e.to_string(), "the leader did not take it: no leader known");
    }
}
