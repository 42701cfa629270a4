//! The [`Replicas`] a running cluster gives: its members as applied
//! here, and one reusable link to each for shadow calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::Replicas;
use crate::cluster::link::LinkConfig;
use crate::cluster::raft::store::ClusterView;
use crate::cluster::rpc::peer::PeerClient;
use crate::cluster::rpc::shadow::{ShadowReply, ShadowRequest};
use crate::cluster::rpc::{Reply, Request};
use crate::cluster::state::groups::delivery_group;
use crate::cluster::{NodeId, NodeState, Role};

/// Shadow calls over the cluster's links.
pub struct ClusterReplicas {
    me: NodeId,
    view: watch::Receiver<ClusterView>,
    link: LinkConfig,
    /// The last takeover of this node's copies it has settled (see
    /// `promote`): until it settles a newer one it makes no copies.
    settled: Arc<AtomicU64>,
    /// Shadow copies get links of their own: a large copy never holds up
    /// raft or group calls behind it.
    clients: Mutex<HashMap<NodeId, (SocketAddr, PeerClient)>>,
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
            link,
            settled,
            clients: Mutex::default(),
        }
    }

    /// This node's delivery epoch as applied here, and whether a takeover
    /// of its copies is still to be settled.
    fn epoch(&self) -> (u64, bool) {
        let v = self.view.borrow();
        let Some(m) = v.state.members.get(&self.me) else {
            return (0, false);
        };
        let g = v.state.groups.get(&delivery_group(&m.member.name));
        let epoch = g.map_or(0, |g| g.epoch);
        let taken = g
            .and_then(|g| g.promoted.get(&self.me))
            .map_or(0, |p| p.epoch);
        (epoch, taken > self.settled.load(Ordering::SeqCst))
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
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        match clients.get(&id) {
            Some((a, c)) if *a == addr => Ok(c.clone()),
            _ => {
                let c = PeerClient::new(addr, self.link.clone(), Some(id));
                clients.insert(id, (addr, c.clone()));
                Ok(c)
            }
        }
    }
}

impl Replicas for ClusterReplicas {
    fn me(&self) -> NodeId {
        self.me
    }

    fn candidates(&self) -> Vec<NodeId> {
        // Its messages that others took over are dropped first: a copy
        // made meanwhile would be dropped with them.
        if self.epoch().1 {
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
        if let ShadowRequest::Store { message } = &mut req {
            message.epoch = self.epoch().0;
        }
        let client = self.client(to);
        Box::pin(async move {
            match client?.call(Request::Shadow(req), timeout).await {
                Ok(Reply::Shadow(r)) => Ok(r),
                Ok(Reply::Unavailable(why)) => Err(why),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}
