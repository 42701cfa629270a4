//! What this node answers: every call that arrives over a cluster link —
//! raft RPCs, status, joins, leaves, the group service's and the shadow
//! service's calls — is routed here ([`NodeService`]) to the part that
//! serves it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::{Raft, Vote};

use super::groups::service::GroupService;
use super::identity::Identity;
use super::link::LinkConfig;
use super::membership::admit;
use super::raft::network::Acks;
use super::raft::store::ClusterView;
use super::rpc::peer::PeerClient;
use super::rpc::server::Handler;
use super::rpc::shadow::ShadowHandler;
use super::rpc::{JoinReply, JoinRequest, Reply, Request, StatusReply};
use super::state::{Command, NodeId, NodeState, TypeConfig};
use futures_util::future::BoxFuture;

/// Answers every call that reaches this node: raft RPCs (handed to the
/// local raft), status, joins (admitted as leader, forwarded as
/// follower), leaves and group calls.
#[derive(Clone)]
pub struct NodeService {
    me: Identity,
    raft: Raft<TypeConfig>,
    join: Option<Arc<JoinSettings>>,
    groups: Option<Arc<GroupService>>,
    /// Answers shadow calls once set (the mail side attaches its holder
    /// after the cluster has started; until then they are unavailable).
    shadows: Arc<std::sync::OnceLock<Arc<dyn ShadowHandler>>>,
    /// When each leader last sent entries or a heartbeat here: a follower's
    /// view of its leader's silence (the failure detector reads it).
    heard: Acks,
}

/// How this node answers joins: as leader it admits, as follower it
/// forwards to the leader over a fresh link.
#[derive(Clone)]
pub struct JoinSettings {
    /// Most voters; later members join without a vote.
    pub max_voters: usize,
    /// A learner must catch up within this, or it is removed again.
    pub join_timeout: Duration,
    /// How to reach the leader when forwarding.
    pub link: LinkConfig,
    /// The replicated state as applied here (a rejoining member that left
    /// is marked up again).
    pub view: tokio::sync::watch::Receiver<ClusterView>,
}

impl JoinSettings {
    async fn handle(&self, raft: &Raft<TypeConfig>, req: JoinRequest) -> JoinReply {
        let m = raft.metrics().borrow().clone();
        if m.current_leader == Some(m.id) {
            let (back, seen) = {
                let v = self.view.borrow();
                let back = v
                    .state
                    .members
                    .get(&req.incarnation)
                    .is_some_and(|m| m.state == NodeState::Left);
                let seen = v.state.restored(req.incarnation, req.generation, req.start);
                (back, seen)
            };
            if let Some(seen) = seen {
                tracing::error!(node = %req.name, incarnation = req.incarnation, generation = req.generation, seen, "refused: a data directory restored from an older copy");
                return JoinReply::Restored {
                    generation: req.generation,
                    seen,
                };
            }
            let reply = admit::admit(raft, &req, self.max_voters, self.join_timeout, back).await;
            if matches!(reply, JoinReply::Admitted { .. }) && req.generation != 0 {
                let started = Command::Started {
                    id: req.incarnation,
                    generation: req.generation,
                    start: req.start,
                };
                // Not recorded: the joiner asks again, and is admitted again.
                if let Err(e) = raft.client_write(started).await {
                    return JoinReply::Retry {
                        reason: format!("recording the start: {e}"),
                    };
                }
            }
            return reply;
        }
        let leader = m.current_leader.and_then(|id| {
            let node = m.membership_config.membership().get_node(&id)?;
            Some((id, node.addr.parse::<SocketAddr>().ok()?))
        });
        let Some((id, addr)) = leader else {
            return JoinReply::Retry {
                reason: "no leader elected yet".into(),
            };
        };
        // The sponsor forwards rather than redirects, so a joiner needs to
        // reach only one member; the leader's answer comes back unchanged.
        let client = PeerClient::new(addr, self.link.clone(), Some(id));
        let deadline = self.join_timeout + FORWARD_MARGIN;
        match client.call(Request::Join(req), deadline).await {
            Ok(Reply::Join(answer)) => answer,
            Ok(other) => JoinReply::Retry {
                reason: format!("the leader could not take the join: {other:?}"),
            },
            Err(e) => JoinReply::Retry {
                reason: format!("forwarding to the leader at {addr}: {e}"),
            },
        }
    }
}

/// Time beyond the join timeout a forwarded join may take (the extra hop).
const FORWARD_MARGIN: Duration = Duration::from_secs(5);

impl NodeService {
    /// A handler for node `me`, whose raft instance is `raft`.
    pub fn new(me: Identity, raft: Raft<TypeConfig>) -> NodeService {
        NodeService {
            me,
            raft,
            join: None,
            groups: None,
            shadows: Arc::default(),
            heard: Acks::default(),
        }
    }

    /// Record when leaders were last heard from in `heard`.
    pub fn with_heard(mut self, heard: Acks) -> NodeService {
        self.heard = heard;
        self
    }

    /// Also answer group calls.
    pub fn with_groups(mut self, groups: Arc<GroupService>) -> NodeService {
        self.groups = Some(groups);
        self
    }

    /// Answer shadow calls with `handler` from now on (once; a second
    /// handler is refused and returned).
    pub fn serve_shadows(
        &self,
        handler: Arc<dyn ShadowHandler>,
    ) -> Result<(), Arc<dyn ShadowHandler>> {
        self.shadows.set(handler)
    }

    /// Also answer joins, with these settings.
    pub fn with_join(mut self, join: JoinSettings) -> NodeService {
        self.join = Some(Arc::new(join));
        self
    }

    /// What this node knows: whether it is in a cluster and who leads it.
    pub async fn status(&self) -> StatusReply {
        let initialized = self.raft.is_initialized().await.unwrap_or(false);
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader.and_then(|id| {
            let node = m.membership_config.membership().get_node(&id)?;
            Some((id, node.addr.parse().ok()?))
        });
        StatusReply {
            name: self.me.name.clone(),
            incarnation: self.me.incarnation,
            initialized,
            leader,
        }
    }
}

impl NodeService {
    /// Records the authenticated caller as left, if this node leads.
    pub async fn leave(&self, from: &Identity) -> Reply {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(m.id) {
            return Reply::Unavailable("not the leader".into());
        }
        let cmd = Command::SetState {
            id: from.incarnation,
            state: NodeState::Left,
            at_ms: crate::clock::now_ms(),
            from: None,
        };
        match self.raft.client_write(cmd).await {
            Ok(r) if r.data.is_ok() => {
                tracing::info!(node = %from.name, "member left");
                Reply::Left
            }
            Ok(_) => Reply::Unavailable(format!("{} is not a member", from.name)),
            Err(e) => Reply::Unavailable(format!("cannot record the leave: {e}")),
        }
    }
}

/// True when the authenticated caller is the node the raft message speaks
/// for: a link's identity must not be usable to act as another node.
fn sent_by(from: &Identity, vote: &Vote<NodeId>) -> bool {
    vote.leader_id().voted_for() == Some(from.incarnation)
}

impl Handler for NodeService {
    fn handle(&self, from: Identity, req: Request) -> BoxFuture<'static, Reply> {
        let this = self.clone();
        Box::pin(async move {
            let impostor = || {
                tracing::warn!(peer = %from.name, "raft message names another sender");
                Reply::Unavailable(format!("sender {} does not match message", from.name))
            };
            match req {
                Request::AppendEntries(r) if sent_by(&from, &r.vote) => {
                    this.heard
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(from.incarnation, tokio::time::Instant::now());
                    Reply::AppendEntries(this.raft.append_entries(r).await)
                }
                Request::Vote(r) if sent_by(&from, &r.vote) => Reply::Vote(this.raft.vote(r).await),
                Request::InstallSnapshot(r) if sent_by(&from, &r.vote) => {
                    Reply::InstallSnapshot(this.raft.install_snapshot(r).await)
                }
                Request::AppendEntries(_) | Request::Vote(_) | Request::InstallSnapshot(_) => {
                    impostor()
                }
                Request::Status => Reply::Status(this.status().await),
                Request::Leave => this.leave(&from).await,
                Request::Group(g) => match &this.groups {
                    Some(service) => Reply::Group(service.handle(&from, g).await),
                    None => Reply::Unavailable("this node runs no groups".into()),
                },
                Request::Shadow(s) => match this.shadows.get() {
                    Some(handler) => Reply::Shadow(handler.handle(from.incarnation, s).await),
                    None => Reply::Unavailable("this node keeps no shadow copies".into()),
                },
                Request::Join(j) => match &this.join {
                    Some(settings) => Reply::Join(settings.handle(&this.raft, j).await),
                    None => Reply::Unavailable("this node does not admit members".into()),
                },
            }
        })
    }
}
