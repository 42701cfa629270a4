//! A node's cluster side, running: identity, durable raft, the link
//! server, the join loop ([`Joiner`]) and failure detection, started and
//! stopped together.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::groups::handle::ClusterHandle;
use super::groups::service::GroupService;
use super::identity::{self, Identity};
use super::link::transport::{Tcp, Transport};
use super::link::LinkConfig;
use super::membership::detector::{self, Thresholds};
use super::membership::join::Joiner;
use super::raft::network::Network;
use super::raft::store::{self, ClusterView};
use super::rpc::peer::PeerClient;
use super::rpc::server;
use super::rpc::shadow::ShadowHandler;
use super::rpc::{Reply, Request};
use super::service::{JoinSettings, NodeService};
use super::state::{Member, Role, TypeConfig};
use crate::backoff::Backoff;
use crate::config::{ClusterConfig, ClusterRole};

/// Deadline for one attempt to record a leave with the leader.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts to record a leave.
const LEAVE_RETRY: Duration = Duration::from_millis(50);
/// Deadline for connect plus handshake on cluster links.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the cluster side could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The node's identity could not be read or made.
    #[error("cluster identity: {0}")]
    Identity(#[from] identity::IdentityError),
    /// The secret file is missing or unusable.
    #[error("cluster secret: {0}")]
    Secret(#[from] identity::SecretError),
    /// The raft store could not be opened.
    #[error("cluster store: {0}")]
    Store(#[from] store::StoreError),
    /// The cluster listener could not be bound.
    #[error("cannot listen for cluster links on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// openraft refused to start.
    #[error("raft: {0}")]
    Raft(String),
}

/// The running cluster side of a node.
pub struct ClusterNode {
    /// This node.
    pub identity: Identity,
    /// The raft handle.
    pub raft: Raft<TypeConfig>,
    /// The replicated state as last applied here.
    pub view: watch::Receiver<ClusterView>,
    /// Where cluster links are accepted.
    pub addr: SocketAddr,
    /// What group code needs of the cluster.
    pub handle: ClusterHandle,
    /// Why this node is not (yet) in its cluster, from its last join or
    /// rejoin attempt; None once admitted.
    pub problem: watch::Receiver<Option<String>>,
    handler: NodeService,
    link: LinkConfig,
    /// Cancelled when the node leaves (or stops): failure detection ends,
    /// as its writes would keep the followers' leader lease fresh and
    /// block the handover, and so does re-announcing a stale leave.
    leaving: CancellationToken,
}

impl ClusterNode {
    /// Fingerprints of the secret this node proves with, then of those it
    /// also accepts.
    pub fn secret_fingerprints(&self) -> Vec<String> {
        self.link.secrets.fingerprints()
    }

    /// Start the cluster side over TCP: everything under `data_dir/cluster`.
    pub async fn start(
        cfg: &ClusterConfig,
        name: &str,
        data_dir: &Path,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<ClusterNode, ClusterError> {
        Self::start_on(Tcp::shared(), cfg, name, data_dir, cancel, tracker).await
    }

    /// Start the cluster side with links carried by `transport`.
    pub async fn start_on(
        transport: Arc<dyn Transport>,
        cfg: &ClusterConfig,
        name: &str,
        data_dir: &Path,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<ClusterNode, ClusterError> {
        let dir = data_dir.join("cluster");
        let identity = Identity::load_or_create(&dir, name)?;
        // Counted before raft runs: the cluster tells a restored copy of
        // this directory by a count behind what it has seen.
        let generation = identity::next_generation(&dir)?;
        // Without randomness the time tells starts apart well enough.
        let start = getrandom::u64().unwrap_or_else(|_| crate::clock::now_ms());
        let secrets = identity::load_keyring(cfg)?;
        if !secrets.accepted.is_empty() {
            // Meant to be temporary: an old secret left accepted still
            // lets whoever holds it in.
            tracing::warn!(
                count = secrets.accepted.len(),
                "also accepting other cluster secrets (accept_secret_files); \
                 remove them once every node proves with the new one"
            );
        }
        let (log, sm) = store::open(&dir)?;
        let view = sm.subscribe();
        let listener =
            transport
                .listen(cfg.listen)
                .await
                .map_err(|source| ClusterError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
        let addr = listener.local_addr().unwrap_or(cfg.listen);
        let link = LinkConfig {
            identity: identity.clone(),
            secrets,
            cluster: cfg.name.clone(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            transport,
        };
        // openraft's leader lease is its largest election timeout: voters
        // refuse to elect anyone until their leader was silent that long.
        let raft_lease = cfg.election_timeout * 2;
        let raft_cfg = openraft::Config {
            cluster_name: cfg.name.clone(),
            heartbeat_interval: cfg.heartbeat_interval.as_millis() as u64,
            election_timeout_min: cfg.election_timeout.as_millis() as u64,
            election_timeout_max: raft_lease.as_millis() as u64,
            ..Default::default()
        };
        let raft_cfg = raft_cfg
            .validate()
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let id = identity.incarnation;
        let network = Network::new(id, link.clone());
        let signals = network.signals();
        let raft = Raft::new(id, Arc::new(raft_cfg), network, log, sm)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let join = JoinSettings {
            max_voters: cfg.max_voters,
            join_timeout: cfg.join_timeout,
            link: link.clone(),
            view: view.clone(),
        };
        let groups = GroupService::new(
            identity.clone(),
            raft.clone(),
            view.clone(),
            dir.join("longest-lease"),
        );
        let handler = NodeService::new(identity.clone(), raft.clone())
            .with_heard(signals.acks.clone())
            .with_join(join)
            .with_groups(groups.clone());
        tracker.spawn(server::serve(
            listener,
            link.clone(),
            Arc::new(handler.clone()),
            cancel.clone(),
        ));
        tracing::info!(
            node = %identity.name,
            incarnation = identity.incarnation,
            %addr,
            "cluster links listening"
        );
        let me = Member {
            name: identity.name.clone(),
            addr: addr.to_string(),
            role: match cfg.role {
                ClusterRole::Member => Role::Member,
                ClusterRole::Witness => Role::Witness,
            },
        };
        let leaving = cancel.child_token();
        let initialized = raft.is_initialized().await.unwrap_or(false);
        let (problem_tx, problem) = watch::channel(
            (!initialized).then(|| "joining: no answer from the seeds yet".to_string()),
        );
        let joiner = Joiner {
            problem: problem_tx,
            raft: raft.clone(),
            view: view.clone(),
            leaving: leaving.clone(),
            local: Arc::new(handler.clone()),
            link: link.clone(),
            me,
            // Asking ourselves would only ever say "fresh".
            seeds: cfg.seeds.iter().copied().filter(|s| *s != addr).collect(),
            backoff: Backoff::new(cfg.join_backoff_min, cfg.join_backoff_max),
            generation,
            start,
        };
        tracker.spawn(joiner.run());
        // Silence of three heartbeats is suspicious; an election timeout's
        // worth means the member would have lost a leader by now: down.
        let thresholds = Thresholds {
            suspect_after: cfg.heartbeat_interval * 3,
            down_after: cfg.election_timeout,
            leader_gone_after: raft_lease + cfg.heartbeat_interval,
        };
        tracker.spawn(detector::run(
            raft.clone(),
            view.clone(),
            signals.clone(),
            cfg.heartbeat_interval,
            thresholds,
            cfg.max_voters,
            leaving.clone(),
        ));
        let handle = ClusterHandle::new(
            identity.clone(),
            raft.clone(),
            view.clone(),
            link.clone(),
            groups,
        );
        Ok(ClusterNode {
            handle,
            identity,
            raft,
            view,
            addr,
            problem,
            handler,
            link,
            leaving,
        })
    }

    /// Answer shadow calls with `handler` from now on (set once; calls
    /// before are answered "unavailable", and the primary copies the
    /// message elsewhere or later).
    pub fn serve_shadows(&self, handler: Arc<dyn ShadowHandler>) {
        if self.handler.serve_shadows(handler).is_err() {
            tracing::warn!("a shadow handler was already attached; keeping the first");
        }
    }

    /// How this node opens links to its peers (for clients of services
    /// above the cluster, such as shadow copies).
    pub fn link(&self) -> LinkConfig {
        self.link.clone()
    }

    /// Leave on purpose (SIGTERM): have the leader record this node as
    /// left, so nobody takes its silence for a failure, then hand
    /// leadership over if it leads. Bounded by `within`; what does not
    /// finish in time is left to failure detection. The node stays a
    /// member and is marked up again when it returns.
    pub async fn leave(&self, within: Duration) {
        let deadline = Instant::now() + within;
        // First, so that neither the detector's writes nor our own joiner
        // (which re-announces a member published as left) undo the leave.
        self.leaving.cancel();
        match timeout_at(deadline, self.record_left()).await {
            Ok(()) => tracing::info!(node = %self.identity.name, "left the cluster"),
            Err(_) => tracing::warn!(
                node = %self.identity.name,
                "could not record the leave in time; the cluster will see this node down"
            ),
        }
        // A leaving node no longer campaigns.
        let rc = self.raft.runtime_config();
        rc.elect(false);
        let me = self.identity.incarnation;
        let m = self.raft.metrics().borrow().clone();
        let others_vote = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v != me);
        if m.current_leader != Some(me) || !others_vote {
            return;
        }
        // openraft 0.9 has no leadership transfer: without heartbeats (and
        // without the detector's writes, which would keep the followers'
        // leader lease fresh) they elect a successor while this node still
        // votes and answers.
        rc.heartbeat(false);
        let handed = self
            .raft
            .wait(Some(deadline.saturating_duration_since(Instant::now())))
            .metrics(|m| m.current_leader.is_some_and(|l| l != me), "a successor")
            .await;
        match handed {
            Ok(m) => tracing::info!(successor = ?m.current_leader, "handed leadership over"),
            Err(_) => tracing::warn!("no successor elected in time; stopping anyway"),
        }
    }

    async fn record_left(&self) {
        loop {
            let m = self.raft.metrics().borrow().clone();
            let leader = m.current_leader.and_then(|id| {
                let node = m.membership_config.membership().get_node(&id)?;
                Some((id, node.addr.parse::<SocketAddr>().ok()?))
            });
            let reply = match leader {
                Some((id, _)) if id == self.identity.incarnation => {
                    self.handler.leave(&self.identity).await
                }
                Some((id, addr)) => {
                    let client = PeerClient::new(addr, self.link.clone(), Some(id));
                    match client.call(Request::Leave, LEAVE_TIMEOUT).await {
                        Ok(r) => r,
                        Err(e) => Reply::Unavailable(e.to_string()),
                    }
                }
                None => Reply::Unavailable("no leader".into()),
            };
            match reply {
                Reply::Left => return,
                other => tracing::debug!(answer = ?other, "leave not recorded yet"),
            }
            tokio::time::sleep(LEAVE_RETRY).await;
        }
    }
}
