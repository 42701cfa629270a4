//! Wires the modules into a running node: spool, queue, delivery and the
//! SMTP listeners, under one cancellation token and task tracker. The
//! stages it starts in are in `stages.rs`; what a node decides about mail
//! is on the mail side (`queue::intake`, `routing`).

mod stages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::stages::{Base, Listeners, Mail};
use crate::cluster::node::{ClusterError, ClusterNode};
use crate::config::{Config, Live};
use crate::lock::DataDirLock;
use crate::queue;
use crate::resource::setup::Groups;
use crate::shadow::{Holder, ReplicatedSpool};
use crate::spool::disk::{filesystem_space, Limits};
use crate::spool::{DiskSpool, Spool, SpoolError};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The spool could not be opened or recovered.
    #[error("cannot open the spool in {path}: {source}")]
    Spool {
        /// The spool directory.
        path: String,
        /// What went wrong.
        source: SpoolError,
    },
    /// The cluster side could not start.
    #[error("{0}")]
    Cluster(#[from] ClusterError),
    /// The STARTTLS certificate or key, or the AUTH credentials, could
    /// not be loaded.
    #[error("cannot load {0}")]
    Tls(String),
    /// The admin token file could not be read, or is empty.
    #[error("cannot read the admin token from {path}: {why}")]
    Token {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// The data directory is another daemon's, or cannot be locked.
    #[error("{0}")]
    DataDir(#[from] crate::lock::LockError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// A running node.
pub struct Node {
    smtp_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    cluster: Option<ClusterNode>,
    groups: Option<Groups>,
    /// This node's spool as it copies messages to other members.
    replicated: Option<Arc<ReplicatedSpool>>,
    /// Other members' copies kept here.
    holder: Option<Holder>,
    stats: tokio::sync::watch::Receiver<queue::Stats>,
    queue: queue::QueueHandle,
    /// What the watchdog probes.
    health: Health,
    /// The configuration a reload changes.
    live: Live,
    /// True while the node's own listeners turn new clients away.
    drain: Arc<watch::Sender<bool>>,
    /// Stops keeping `drain` in step with the cluster's drain.
    drain_follow: CancellationToken,
    /// The sessions of the node's own listeners.
    sessions: TaskTracker,
    /// Reloads asked for through the admin API, for whoever runs the node
    /// (it knows the file).
    reloads: std::sync::Mutex<Option<mpsc::Receiver<crate::admin::ReloadRequest>>>,
    /// The node's own SMTP listeners: stopped first at shutdown, while the
    /// queue still delivers what the groups' draining sessions accept.
    smtp_cancel: CancellationToken,
    /// Tells SMTP sessions the node stops.
    smtp_stopping: CancellationToken,
    cancel: CancellationToken,
    /// Separate from `cancel`: the cluster side outlives SMTP at shutdown
    /// long enough to say goodbye.
    cluster_cancel: CancellationToken,
    tracker: TaskTracker,
    /// Held while the node runs: no other daemon uses its data directory.
    _data_dir: DataDirLock,
}

/// The parts of a node that must answer for it to be alive: the queue's
/// driver and the spool's writer (a hung fsync stops the one, a stuck
/// driver the other).
#[derive(Clone)]
pub struct Health {
    queue: queue::QueueHandle,
    spool: Arc<dyn Spool>,
}

impl Health {
    /// Ok if both answer within `within`; else which does not.
    pub async fn probe(&self, within: Duration) -> Result<(), &'static str> {
        let queue = self.queue.list(Default::default(), None, 1);
        match tokio::time::timeout(within, queue).await {
            Ok(Some(_)) => {}
            _ => return Err("the queue does not answer"),
        }
        match tokio::time::timeout(within, self.spool.probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the spool is closed"),
            Err(_) => Err("the spool does not answer (a write or fsync hangs)"),
        }
    }
}

/// Longest a node spends saying goodbye to its cluster at shutdown.
const LEAVE_WITHIN: Duration = Duration::from_secs(5);

impl Node {
    /// Start a node with the durable spool under `data_dir/spool`.
    pub async fn start(config: Config) -> Result<Node, StartError> {
        // Before anything in it is opened.
        let lock = DataDirLock::acquire(&config.node.data_dir)?;
        let dir = config.node.data_dir.join("spool");
        let fail = |source| StartError::Spool {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(|e| fail(e.into()))?;
        let (total, _) = filesystem_space(&dir).map_err(|e| fail(e.into()))?;
        let limits = Limits::for_filesystem(total, config.spool.max_size);
        let spool = DiskSpool::open_with(&dir, limits).map_err(fail)?;
        Self::start_locked(config, Arc::new(spool), lock).await
    }

    /// Start a node on the given spool (tests pass a fault-injecting one).
    pub async fn start_with_spool(
        config: Config,
        spool: Arc<dyn Spool>,
    ) -> Result<Node, StartError> {
        let lock = DataDirLock::acquire(&config.node.data_dir)?;
        Self::start_locked(config, spool, lock).await
    }

    /// Start the node in stages, each on what the earlier ones made.
    async fn start_locked(
        config: Config,
        spool: Arc<dyn Spool>,
        lock: DataDirLock,
    ) -> Result<Node, StartError> {
        let listeners = Listeners::bind(&config).await?;
        stages::check_files(&config)?;
        let base = Base::new(config);
        let cluster = stages::start_cluster(&base).await?;
        let shadows = stages::start_shadows(&base, spool, cluster.as_ref())?;
        let mut mail = Mail::start(&base, shadows.spool.clone(), cluster.as_ref());
        mail.readout.replicated = shadows.replicated.clone();
        let ready = stages::start_promoter(&base, cluster.as_ref(), &shadows, &mail);
        let groups = stages::start_groups(
            &base,
            cluster.as_ref(),
            mail.intake.clone(),
            (mail.source, mail.gate, ready),
        );
        let drain = stages::follow_cluster(&base, cluster.as_ref());
        let smtp = stages::serve_smtp(&base, listeners.smtp, &mail.intake, &drain.switch);
        let admin = stages::serve_admin(
            &base,
            listeners.admin,
            cluster.as_ref(),
            shadows.holder.as_ref(),
            &mail.stats,
            mail.readout,
            &drain.switch,
        )?;
        Ok(Node {
            smtp_addrs: smtp.addrs,
            admin_addr: admin.addr,
            cluster,
            groups,
            replicated: shadows.replicated,
            holder: shadows.holder,
            stats: mail.stats,
            queue: mail.queue,
            health: mail.health,
            live: base.live,
            drain: drain.switch,
            drain_follow: drain.follow,
            sessions: smtp.sessions,
            reloads: std::sync::Mutex::new(Some(admin.reloads)),
            smtp_cancel: smtp.cancel,
            smtp_stopping: smtp.stopping,
            cancel: base.cancel,
            cluster_cancel: base.cluster_cancel,
            tracker: base.tracker,
            _data_dir: lock,
        })
    }

    /// The cluster side, when `[cluster]` is configured.
    pub fn cluster(&self) -> Option<&ClusterNode> {
        self.cluster.as_ref()
    }

    /// This node's copies on other members, when it makes any.
    pub fn replicated(&self) -> Option<&Arc<ReplicatedSpool>> {
        self.replicated.as_ref()
    }

    /// Other members' copies kept on this node, in a cluster.
    pub fn holder(&self) -> Option<&Holder> {
        self.holder.as_ref()
    }

    /// Where the admin API listens, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The addresses the SMTP listeners are bound to.
    pub fn smtp_addrs(&self) -> &[SocketAddr] {
        &self.smtp_addrs
    }

    /// Switch to `new` (already validated) without dropping a connection
    /// or a message: sessions, associations and routing decisions begun
    /// before go on as they were. What only a restart applies keeps its
    /// running value. Returns what changed and what was kept.
    pub fn reload(&self, new: Config) -> crate::config::Applied {
        self.live.apply(new)
    }

    /// Reloads asked for through the admin API (once: the caller serves
    /// them, answering each).
    pub fn reload_requests(&self) -> Option<mpsc::Receiver<crate::admin::ReloadRequest>> {
        self.reloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The configuration now.
    pub fn config(&self) -> Arc<Config> {
        self.live.current()
    }

    /// What a watchdog probes: the queue and the spool.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The queue, for operators' requests.
    pub fn queue(&self) -> &queue::QueueHandle {
        &self.queue
    }

    /// Outcome counts, updated as they change (tests await them).
    pub fn stats(&self) -> tokio::sync::watch::Receiver<queue::Stats> {
        self.stats.clone()
    }

    /// Stop gracefully within about `grace` per step: turn new clients
    /// away with 421, let open sessions finish while the groups are handed
    /// over (then tell the rest 421), leave the cluster (handing
    /// leadership over), let deliveries in hand finish, then return.
    pub async fn shutdown(self, grace: Duration) {
        // New clients get 421 at once; open transactions may finish while
        // the groups drain and are released — with the cluster still
        // running, so the leader places them elsewhere at once, and the
        // queue still delivering what their sessions accept.
        self.drain_follow.cancel();
        self.drain.send_replace(true);
        // Only transactions under way get the grace.
        self.smtp_stopping.cancel();
        self.sessions.close();
        let sessions = async {
            if tokio::time::timeout(grace, self.sessions.wait())
                .await
                .is_err()
            {
                tracing::warn!("shutdown grace expired with SMTP sessions open: they get 421");
            }
        };
        let groups = async {
            if let Some(g) = self.groups {
                g.stop(grace).await;
            }
        };
        tokio::join!(sessions, groups);
        self.smtp_cancel.cancel();
        self.cancel.cancel();
        // The queue has stopped: what it recorded last goes to the holders
        // before the links do.
        if let Some(r) = &self.replicated {
            r.flush(grace.min(LEAVE_WITHIN)).await;
        }
        if let Some(c) = &self.cluster {
            c.leave(grace.min(LEAVE_WITHIN)).await;
        }
        self.cluster_cancel.cancel();
        if let Some(c) = &self.cluster {
            if let Err(e) = c.raft.shutdown().await {
                tracing::warn!(error = %e, "raft did not shut down cleanly");
            }
        }
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace expired with tasks still running");
        }
    }
}
