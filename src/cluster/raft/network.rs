//! openraft's network over cluster links: one [`PeerClient`] per target
//! (the serving side is [`crate::cluster::service::NodeService`]).

use std::collections::HashMap;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::RPCTypes;

use crate::cluster::link::LinkConfig;
use crate::cluster::rpc::peer::{CallError, PeerClient};
use crate::cluster::rpc::{Reply, Request};
use crate::cluster::state::{Member, NodeId, TypeConfig};

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
