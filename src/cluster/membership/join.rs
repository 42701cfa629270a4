//! Joining: a node without cluster state asks its seeds, then bootstraps
//! a new cluster or joins through a member ([`decide::start`] decides);
//! a restarted member announces it is back. Retries with backoff forever.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::decide::{self, SeedView, Start};
use crate::backoff::{jitter, Backoff};
use crate::cluster::link::LinkConfig;
use crate::cluster::raft::store::ClusterView;
use crate::cluster::rpc::peer::PeerClient;
use crate::cluster::rpc::server::Handler;
use crate::cluster::rpc::{JoinReply, JoinRequest, Reply, Request};
use crate::cluster::state::{Member, NodeState, TypeConfig};

/// Deadline for one Status or connect to a seed during the join loop.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The join loop: bootstraps or joins a node without cluster state, and
/// tells the leader a restarted member is back.
pub struct Joiner {
    /// Why this node is not in a cluster yet; None once it is.
    pub problem: watch::Sender<Option<String>>,
    /// This node's raft.
    pub raft: Raft<TypeConfig>,
    /// The replicated state as applied here.
    pub view: watch::Receiver<ClusterView>,
    /// Fires when the node leaves: the loop stops.
    pub leaving: CancellationToken,
    /// This node's own service: a rejoin asks it first (it admits as
    /// leader, or forwards to the leader it follows).
    pub local: Arc<dyn Handler>,
    /// Keys and identity for links to the seeds.
    pub link: LinkConfig,
    /// This member as the state should record it.
    pub me: Member,
    /// Where to ask; never this node itself.
    pub seeds: Vec<SocketAddr>,
    /// The pause between attempts.
    pub backoff: Backoff,
    /// This start of the data directory ([`crate::cluster::identity::next_generation`]).
    pub generation: u64,
    /// This start's random id.
    pub start: u64,
}

impl Joiner {
    /// Run until admitted, and again whenever the state says this node
    /// left while it runs; returns when `leaving` fires.
    pub async fn run(mut self) {
        // A node restarted with cluster state rejoins from what it
        // persisted, and still tells the leader it is back, so a member
        // that left is published up again. A node without state keeps
        // going until admitted — not merely until some membership reached
        // us, since a join cut short must come back to finish.
        let mut rejoin = self.raft.is_initialized().await.unwrap_or(false);
        loop {
            let leaving = self.leaving.clone();
            let outcome = tokio::select! {
                _ = leaving.cancelled() => return,
                o = async { if rejoin { self.rejoin().await } else { self.attempt().await } } => o,
            };
            let delay = match outcome {
                Ok(()) => {
                    tracing::info!(node = %self.me.name, rejoin, "joined the cluster");
                    self.problem.send_replace(None);
                    if !rejoin {
                        self.backoff.reset();
                    }
                    rejoin = true;
                    // A leave of ours that landed after we came back (it
                    // was slow to commit) says "left" while we run: say
                    // again that we are here.
                    let me = self.link.identity.incarnation;
                    let left = |v: &ClusterView| {
                        v.state
                            .members
                            .get(&me)
                            .is_some_and(|m| m.state == NodeState::Left)
                    };
                    let mut view = self.view.clone();
                    tokio::select! {
                        _ = self.leaving.cancelled() => return,
                        r = view.wait_for(left) => if r.is_err() {
                            return; // the state machine is gone: raft stopped
                        },
                    }
                    // Pause first: a view lagging behind our announcement
                    // still says "left" and must not make us spin.
                    self.backoff.next(jitter())
                }
                Err(why) => {
                    tracing::info!(node = %self.me.name, %why, rejoin, "not in a cluster yet");
                    self.problem.send_replace(Some(why));
                    self.backoff.next(jitter())
                }
            };
            tokio::select! {
                _ = self.leaving.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt: ask every seed, then bootstrap, join, or wait.
    async fn attempt(&mut self) -> Result<(), String> {
        let mut views = Vec::with_capacity(self.seeds.len());
        let mut problems = Vec::new();
        for &seed in &self.seeds {
            let view = match self.probe(seed).await {
                Ok(v) => v,
                Err(why) => {
                    problems.push(format!("{seed}: {why}"));
                    SeedView::Unreachable
                }
            };
            views.push((seed, view));
        }
        match decide::start(&self.me.name, &views) {
            Start::Bootstrap => {
                let me = BTreeMap::from([(self.link.identity.incarnation, self.me.clone())]);
                self.raft
                    .initialize(me)
                    .await
                    .map_err(|e| format!("bootstrap failed: {e}"))?;
                tracing::info!(node = %self.me.name, "bootstrapped a new cluster");
                Ok(())
            }
            Start::Join(sponsor) => self.join(sponsor).await,
            Start::Wait if problems.is_empty() => {
                Err("waiting for a lower-named fresh seed to bootstrap".into())
            }
            Start::Wait => Err(format!("seeds not usable: {}", problems.join("; "))),
        }
    }

    /// Announce a restarted member through our own handler, which admits
    /// (as leader) or forwards to the leader it follows; then through the
    /// seeds, for a node the cluster no longer replicates to (evicted).
    async fn rejoin(&mut self) -> Result<(), String> {
        let req = self.request()?;
        let me = self.link.identity.clone();
        let local = match self.local.handle(me, Request::Join(req)).await {
            Reply::Join(JoinReply::Admitted { .. }) => return Ok(()),
            Reply::Join(JoinReply::Restored { generation, seen }) => {
                return Err(self.restored(generation, seen).await)
            }
            other => format!("{other:?}"),
        };
        let mut problems = vec![format!("here: {local}")];
        for seed in self.seeds.clone() {
            match self.join(seed).await {
                Ok(()) => return Ok(()),
                // Refused for good (a restored copy): no other seed to ask.
                Err(e) if self.leaving.is_cancelled() => return Err(e),
                Err(e) => problems.push(e),
            }
        }
        Err(problems.join("; "))
    }

    fn request(&self) -> Result<JoinRequest, String> {
        Ok(JoinRequest {
            name: self.me.name.clone(),
            incarnation: self.link.identity.incarnation,
            addr: self
                .me
                .addr
                .parse()
                .map_err(|e| format!("own address: {e}"))?,
            role: self.me.role,
            generation: self.generation,
            start: self.start,
        })
    }

    /// The cluster says this data directory is an older copy of one that
    /// ran since: stop raft (no vote, no log from it) and the loop; the
    /// reason returned is what `ctl status` shows until an operator wipes
    /// the cluster state.
    async fn restored(&mut self, generation: u64, seen: u64) -> String {
        let why = format!(
            "this data directory is an older copy (start {generation}; the cluster saw start {seen}): \
             it no longer takes part; remove its cluster/ directory and start again to rejoin \
             as a new member"
        );
        tracing::error!(node = %self.me.name, generation, seen, "{why}");
        if let Err(e) = self.raft.shutdown().await {
            tracing::error!(error = %e, "raft did not stop");
        }
        self.leaving.cancel();
        why
    }

    /// Ask a seed for its status; the error says why it is no use, in
    /// words for the log (wrong secret, wrong cluster, refused, …).
    async fn probe(&self, seed: SocketAddr) -> Result<SeedView, String> {
        let client = PeerClient::new(seed, self.link.clone(), None);
        match client.call(Request::Status, PROBE_TIMEOUT).await {
            Ok(Reply::Status(s)) if s.initialized => Ok(SeedView::Member),
            Ok(Reply::Status(s)) => Ok(SeedView::Fresh { name: s.name }),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn join(&mut self, sponsor: SocketAddr) -> Result<(), String> {
        let req = self.request()?;
        let client = PeerClient::new(sponsor, self.link.clone(), None);
        // The sponsor may wait for us to catch up as a learner.
        let deadline = Duration::from_secs(60);
        match client.call(Request::Join(req), deadline).await {
            Ok(Reply::Join(JoinReply::Admitted { voter })) => {
                tracing::info!(%sponsor, voter, "admitted");
                self.backoff.reset();
                Ok(())
            }
            Ok(Reply::Join(JoinReply::Retry { reason })) => Err(format!("{sponsor}: {reason}")),
            Ok(Reply::Join(JoinReply::Restored { generation, seen })) => {
                Err(self.restored(generation, seen).await)
            }
            Ok(Reply::Join(JoinReply::Refused { reason })) => {
                tracing::error!(%sponsor, %reason, "join refused");
                Err(format!("refused by {sponsor}: {reason}"))
            }
            Ok(other) => Err(format!("{sponsor} answered {other:?}")),
            Err(e) => Err(format!("join through {sponsor}: {e}")),
        }
    }
}
