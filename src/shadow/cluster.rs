//! The [`Replicas`] a running cluster gives: its members as applied
//! here, and one reusable link to each for shadow calls.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::Replicas;
use crate::cluster::link::LinkConfig;
use crate::cluster::raft::store::ClusterView;
use crate::cluster::rpc::peer::{PeerClient, PeerClients};
use crate::cluster::rpc::shadow::{ShadowReply, ShadowRequest};
use crate::cluster::rpc::{Reply, Request};
use crate::cluster::state::groups::delivery_group;
use crate::cluster::{NodeId, NodeState, Role};

/// Shadow calls over the cluster's links.
pub struct ClusterReplicas {
    me: NodeId,
    view: watch::Receiver<ClusterView>,
    /// The last takeover of this node's copies it has settled (see
    /// `promote`): until it settles a newer one it makes no copies.
    settled: Arc<AtomicU64>,
    /// Shadow copies get links of their own: a large copy never holds up
    /// raft or group calls behind it.
    clients: PeerClients,
}

impl ClusterReplicas {
    /// For node `me`, members as `view` says, links made with `link`;
    /// copies only once `settled` has reached its last takeover.
    pub fn new(
        me: NodeId,
        view: watch::Receiver<ClusterView>,
        link: LinkConfig,
        settled: Arc<AtomicU64>,
    ) -> Self {
        ClusterReplicas {
            me,
            view,
            clients: PeerClients::new(link),
            settled,
        }
    }

    /// Whether a takeover of this node's copies is still to be settled.
    fn unsettled(&self) -> bool {
        let v = self.view.borrow();
        let me = v.state.members.get(&self.me);
        let g = me.and_then(|m| v.state.groups.get(&delivery_group(&m.member.name)));
        let taken = g
            .and_then(|g| g.promoted.get(&self.me))
            .map_or(0, |p| p.epoch);
        taken > self.settled.load(Ordering::SeqCst)
    }

    /// One reusable client per member; a new one when its address changes.
    fn client(&self, id: NodeId) -> Result<PeerClient, String> {
        let addr: SocketAddr = {
            let v = self.view.borrow();
            let m = v
                .state
                .members
                .get(&id)
                .ok_or_else(|| format!("{id:016x} is not a member"))?;
            m.member
                .addr
                .parse()
                .map_err(|e| format!("address of {id:016x}: {e}"))?
        };
        Ok(self.clients.get(id, addr))
    }
}

/// The delivery epoch node `me` holds, live, in `view`.
fn live_epoch(view: &ClusterView, me: NodeId) -> Option<u64> {
    let m = view.state.members.get(&me)?;
    let g = view.state.groups.get(&delivery_group(&m.member.name))?;
    (g.owner == Some(me) && !g.revoked && !g.released).then_some(g.epoch)
}

impl Replicas for ClusterReplicas {
    fn me(&self) -> NodeId {
        self.me
    }

    fn candidates(&self) -> Vec<NodeId> {
        // Its messages that others took over are dropped first: a copy
        // made meanwhile would be dropped with them.
        if self.unsettled() {
            return Vec::new();
        }
        let v = self.view.borrow();
        v.state
            .members
            .iter()
            .filter(|(id, m)| {
                **id != self.me && m.state == NodeState::Up && m.member.role == Role::Member
            })
            .map(|(id, _)| *id)
            .collect()
    }

    fn is_member(&self, node: NodeId) -> bool {
        self.view.borrow().state.members.contains_key(&node)
    }

    fn call(
        &self,
        to: NodeId,
        req: ShadowRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<ShadowReply, String>> {
        let mut req = req;
        let client = self.client(to);
        let (mut view, me) = (self.view.clone(), self.me);
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            if let ShadowRequest::Store { message } = &mut req {
                // Holders take copies only under a live delivery epoch:
                // one is placed within a second of joining, so mail
                // accepted before waits for it rather than go uncopied.
                let live = view.wait_for(|v| live_epoch(v, me).is_some());
                let live = tokio::time::timeout_at(deadline, live).await;
                let Ok(Ok(v)) = live else {
                    return Err("this node holds no delivery lease to copy under".into());
                };
                message.epoch = live_epoch(&v, me).unwrap_or(0);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match client?.call(Request::Shadow(req), left).await {
                Ok(Reply::Shadow(r)) => Ok(r),
                Ok(Reply::Unavailable(why)) => Err(why),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}
