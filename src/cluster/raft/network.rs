//! openraft's network over cluster links: the client side
//! ([`Network`], one [`PeerClient`] per target) and the serving side
//! ([`RaftHandler`], which hands incoming raft RPCs to the local node).

use std::collections::HashMap;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RPCTypes, Raft, Vote};

use super::store::ClusterView;
use crate::cluster::admit;
use crate::cluster::detector;
use crate::cluster::group_rpc::GroupService;
use crate::cluster::identity::Identity;
use crate::cluster::link::LinkConfig;
use crate::cluster::peer::{CallError, PeerClient};
use crate::cluster::rpc::{JoinReply, JoinRequest, Reply, Request, StatusReply};
use crate::cluster::server::{BoxFuture, Handler};
use crate::cluster::state::{Command, Member, NodeId, NodeState, TypeConfig};

/// Why a reply could not be used; surfaces inside openraft's errors.
#[derive(Debug, thiserror::Error)]
enum NetError {
    #[error("member address {addr:?} is not ip:port")]
    BadAddr { addr: String },
    #[error("peer cannot serve raft: {0}")]
    Unavailable(String),
    #[error("peer answered {got} to {sent}")]
    WrongReply { sent: &'static str, got: String },
}

/// openraft's network factory: hands out clients for raft targets, reusing
/// one [`PeerClient`] per (node, address) so its link and its connect
/// backoff outlive openraft's short-lived per-RPC clients.
pub struct Network {
    me: NodeId,
    cfg: LinkConfig,
    clients: HashMap<NodeId, (String, PeerClient)>,
    acks: Acks,
    outlogged: Outlogged,
}

/// When each peer last answered a raft RPC: what failure detection reads.
pub type Acks = Arc<std::sync::Mutex<HashMap<NodeId, tokio::time::Instant>>>;

/// When a voter last refused this node's candidacy because its own log is
/// longer. Such a candidate cannot win against that voter, and while it
/// keeps campaigning the voter — which keeps its old term when it refuses
/// — can never get ahead of it by a term; so it stands back a while.
pub type Outlogged = Arc<std::sync::Mutex<Option<tokio::time::Instant>>>;

/// What the network layer observes for the failure detector.
#[derive(Clone, Default)]
pub struct Signals {
    /// When each peer last answered (and each leader last called).
    pub acks: Acks,
    /// When this node was last refused for a shorter log.
    pub outlogged: Outlogged,
}

impl Network {
    /// A factory for node `me` that opens links with `cfg`.
    pub fn new(me: NodeId, cfg: LinkConfig) -> Network {
        Network {
            me,
            cfg,
            clients: HashMap::new(),
            acks: Acks::default(),
            outlogged: Outlogged::default(),
        }
    }

    /// What this network tells the failure detector.
    pub fn signals(&self) -> Signals {
        Signals {
            acks: self.acks.clone(),
            outlogged: self.outlogged.clone(),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerNetwork {
        let client = match self.clients.get(&target) {
            Some((addr, c)) if *addr == node.addr => Ok(c.clone()),
            // New node, or it moved: a fresh client (the old one, and its
            // link, go away when no RPC holds them any more).
            _ => match node.addr.parse::<SocketAddr>() {
                Ok(sa) => {
                    let c = PeerClient::new(sa, self.cfg.clone(), Some(target));
                    self.clients.insert(target, (node.addr.clone(), c.clone()));
                    Ok(c)
                }
                Err(_) => Err(NetError::BadAddr {
                    addr: node.addr.clone(),
                }),
            },
        };
        PeerNetwork {
            me: self.me,
            target,
            node: node.clone(),
            client: client.map_err(Arc::new),
            acks: self.acks.clone(),
            outlogged: self.outlogged.clone(),
        }
    }
}

/// openraft's client for one target node.
pub struct PeerNetwork {
    me: NodeId,
    target: NodeId,
    node: Member,
    client: Result<PeerClient, Arc<NetError>>,
    acks: Acks,
    outlogged: Outlogged,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, Member, E>;

impl PeerNetwork {
    /// Makes the call within openraft's soft TTL, so our timeout (which
    /// also drops a wedged link) fires before openraft abandons the call.
    async fn call<E: Error>(
        &self,
        req: Request,
        action: RPCTypes,
        option: &RPCOption,
    ) -> Result<Reply, RpcErr<E>> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(e.as_ref())))?;
        let timeout = option.soft_ttl();
        match client.call(req, timeout).await {
            // Raft not running there: as good as unreachable; back off.
            Ok(Reply::Unavailable(why)) => Err(RPCError::Unreachable(Unreachable::new(
                &NetError::Unavailable(why),
            ))),
            Ok(reply) => {
                let mut acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
                acks.insert(self.target, tokio::time::Instant::now());
                Ok(reply)
            }
            Err(e @ CallError::TimedOut { .. }) => {
                tracing::debug!(target = self.target, error = %e, "raft rpc timed out");
                Err(RPCError::Timeout(Timeout {
                    action,
                    id: self.me,
                    target: self.target,
                    timeout,
                }))
            }
            // openraft backs off from an unreachable node; a link lost
            // under a call is retried at once (on a fresh link).
            Err(e) if e.is_unreachable() => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn remote<E: Error>(&self, e: E) -> RpcErr<E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }
}

fn wrong<E: Error>(sent: &'static str, got: &Reply) -> RpcErr<E> {
    let got = format!("{got:?}");
    // A reply's debug text can be large; the variant name is the point.
    let got = got.split(['(', ' ']).next().unwrap_or_default().to_string();
    RPCError::Network(NetworkError::new(&NetError::WrongReply { sent, got }))
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<RaftError<NodeId>>> {
        let req = Request::AppendEntries(rpc);
        match self.call(req, RPCTypes::AppendEntries, &option).await? {
            Reply::AppendEntries(r) => r.map_err(|e| self.remote(e)),
            other => Err(wrong("AppendEntries", &other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<RaftError<NodeId, InstallSnapshotError>>>
    {
        let req = Request::InstallSnapshot(rpc);
        match self.call(req, RPCTypes::InstallSnapshot, &option).await? {
            Reply::InstallSnapshot(r) => r.map_err(|e| self.remote(e)),
            other => Err(wrong("InstallSnapshot", &other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<RaftError<NodeId>>> {
        let mine = rpc.last_log_id;
        let req = Request::Vote(rpc);
        match self.call(req, RPCTypes::Vote, &option).await? {
            Reply::Vote(Ok(r)) => {
                if !r.vote_granted && r.last_log_id > mine {
                    let mut at = self.outlogged.lock().unwrap_or_else(|e| e.into_inner());
                    *at = Some(tokio::time::Instant::now());
                }
                Ok(r)
            }
            Reply::Vote(Err(e)) => Err(self.remote(e)),
            other => Err(wrong("Vote", &other)),
        }
    }
}

/// Serves incoming calls from the local raft node: raft RPCs and status.
#[derive(Clone)]
pub struct RaftHandler {
    me: Identity,
    raft: Raft<TypeConfig>,
    join: Option<Arc<JoinSettings>>,
    groups: Option<Arc<GroupService>>,
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
            let back = self
                .view
                .borrow()
                .state
                .members
                .get(&req.incarnation)
                .is_some_and(|m| m.state == NodeState::Left);
            return admit::admit(raft, &req, self.max_voters, self.join_timeout, back).await;
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

impl RaftHandler {
    /// A handler for node `me`, whose raft instance is `raft`.
    pub fn new(me: Identity, raft: Raft<TypeConfig>) -> RaftHandler {
        RaftHandler {
            me,
            raft,
            join: None,
            groups: None,
            heard: Acks::default(),
        }
    }

    /// Record when leaders were last heard from in `heard`.
    pub fn with_heard(mut self, heard: Acks) -> RaftHandler {
        self.heard = heard;
        self
    }

    /// Also answer group calls.
    pub fn with_groups(mut self, groups: Arc<GroupService>) -> RaftHandler {
        self.groups = Some(groups);
        self
    }

    /// Also answer joins, with these settings.
    pub fn with_join(mut self, join: JoinSettings) -> RaftHandler {
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

impl RaftHandler {
    /// Records the authenticated caller as left, if this node leads.
    pub async fn leave(&self, from: &Identity) -> Reply {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(m.id) {
            return Reply::Unavailable("not the leader".into());
        }
        let cmd = Command::SetState {
            id: from.incarnation,
            state: NodeState::Left,
            at_ms: detector::now_ms(),
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

impl Handler for RaftHandler {
    fn handle(&self, from: Identity, req: Request) -> BoxFuture<Reply> {
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
                Request::Join(j) => match &this.join {
                    Some(settings) => Reply::Join(settings.handle(&this.raft, j).await),
                    None => Reply::Unavailable("this node does not admit members".into()),
                },
            }
        })
    }
}

#[cfg(test)]
#[path = "network_tests.rs"]
mod tests;
