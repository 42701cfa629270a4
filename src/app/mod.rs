//! Wires the modules into a running node: spool, queue, delivery and the
//! SMTP listeners, under one cancellation token and task tracker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::node::{ClusterError, ClusterNode};
use crate::config::{ClusterRole, Config, Live};
use crate::delivery::Destinations;
use crate::lock::DataDirLock;
use crate::queue::intake::Intake;
use crate::queue::{self, QueueParts};
use crate::resource::setup::Groups;
use crate::resource::source::SourceSlot;
use crate::routing::{Handover, Router};
use crate::smtp::{server, Accept};
use crate::spool::disk::{filesystem_space, Limits};
use crate::spool::{DiskSpool, IdGen, QueueId, Spool, SpoolError};

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

    async fn start_locked(
        config: Config,
        spool: Arc<dyn Spool>,
        lock: DataDirLock,
    ) -> Result<Node, StartError> {
        // Bind first: a node that cannot listen fails before it starts
        // delivering anything. A witness only votes: no SMTP at all.
        let witness = config
            .cluster
            .as_ref()
            .is_some_and(|c| c.role == ClusterRole::Witness);
        let smtp_listen = if witness {
            &[][..]
        } else {
            &config.smtp.listen[..]
        };
        let admin =
            match &config.admin {
                Some(a) => Some(tokio::net::TcpListener::bind(a.listen).await.map_err(
                    |source| StartError::Listen {
                        addr: a.listen,
                        source,
                    },
                )?),
                None => None,
            };
        let implicit: &[SocketAddr] = match &config.smtp.tls {
            Some(t) if !witness => &t.implicit_listen,
            _ => &[],
        };
        let mut listeners = Vec::new();
        for (&addr, implicit) in smtp_listen
            .iter()
            .map(|a| (a, false))
            .chain(implicit.iter().map(|a| (a, true)))
        {
            let listener = server::bind(addr, config.smtp.backlog)
                .map_err(|source| StartError::Listen { addr, source })?;
            listeners.push((addr, listener, implicit));
        }
        let problems = crate::smtp::check_files(&config.smtp);
        if !problems.is_empty() {
            let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            return Err(StartError::Tls(text.join("; ")));
        }
        let live = Live::new(config.clone());
        // One table of client addresses for all the node's listeners,
        // its own and its groups'.
        let clients = Arc::new(crate::smtp::clients::Clients::default());
        let config = Arc::new(config);
        let cancel = CancellationToken::new();
        let cluster_cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let cluster = match &config.cluster {
            Some(c) => Some(
                ClusterNode::start(
                    c,
                    &config.node.name,
                    &config.node.data_dir,
                    cluster_cancel.clone(),
                    &tracker,
                )
                .await?,
            ),
            None => None,
        };
        let floor = spool
            .recovered()
            .iter()
            .map(|r| r.envelope.id)
            .max()
            .unwrap_or(QueueId(0));
        let ids = Arc::new(IdGen::new(floor));
        let (results_tx, results) = mpsc::unbounded_channel();
        let destinations = Destinations::new(
            live.delivery(),
            config.smtp.hostname.clone(),
            spool.clone(),
            results_tx.clone(),
            cancel.child_token(),
            tracker.clone(),
        );
        let source = SourceSlot::default();
        {
            let destinations = destinations.clone();
            source.on_withdraw(move |addr| destinations.withdraw(addr));
        }
        let handover = cluster
            .as_ref()
            .map(|c| Handover::new(c.handle.view.clone(), c.identity.incarnation, &config));
        let readout = destinations.clone();
        let router = Arc::new(Router::new(
            source.clone(),
            handover,
            spool.clone(),
            destinations,
            results_tx,
            tracker.clone(),
        ));
        let (stats_tx, stats) = tokio::sync::watch::channel(queue::Stats::default());
        let queue = queue::spawn(QueueParts {
            stats: stats_tx,
            config: live.config(),
            spool: spool.clone(),
            dispatch: router,
            results,
            ids: ids.clone(),
            cancel: cancel.child_token(),
            tracker: tracker.clone(),
            held_file: Some(config.node.data_dir.join("spool").join("held")),
        });
        let queue_handle = queue.clone();
        let health = Health {
            queue: queue.clone(),
            spool: spool.clone(),
        };
        let mail = crate::admin::MailReadout {
            queue: queue.clone(),
            spool: spool.clone(),
            destinations: readout,
        };
        let intake: Arc<dyn Accept> =
            Arc::new(Intake::new(spool, queue, ids, config.smtp.hostname.clone()));
        let groups = cluster.as_ref().map(|c| {
            crate::resource::setup::start(
                &config,
                (live.smtp(), clients.clone()),
                c,
                intake.clone(),
                source,
                cluster_cancel.clone(),
            )
        });
        // While an operator drains the node its own listeners turn new
        // clients away; in a cluster the drain is in the replicated state.
        let drain = Arc::new(watch::Sender::new(false));
        // Stopped first at shutdown: leaving changes the view, and the
        // drain must not be lifted then.
        let drain_follow = CancellationToken::new();
        if let Some(c) = &cluster {
            tracker.spawn(follow_drain(
                c.handle.view.clone(),
                c.identity.incarnation,
                drain.clone(),
                drain_follow.clone(),
            ));
            tracker.spawn(follow_members(
                c.handle.view.clone(),
                clients.clone(),
                cluster_cancel.clone(),
            ));
        }
        let smtp = live.smtp();
        // The node's own sessions, apart: a stop waits for them to finish.
        let sessions = TaskTracker::new();
        let smtp_cancel = cancel.child_token();
        let mut smtp_addrs = Vec::new();
        for (addr, listener, implicit) in listeners {
            let local = listener.local_addr().unwrap_or(addr);
            smtp_addrs.push(local);
            tracing::info!(address = %local, implicit_tls = implicit, "smtp listening");
            let how = server::Listener {
                cfg: smtp.clone(),
                accept: intake.clone(),
                drain: drain.subscribe(),
                cancel: smtp_cancel.child_token(),
                tracker: sessions.clone(),
                implicit_tls: implicit,
                clients: clients.clone(),
            };
            tracker.spawn(server::serve_listener(listener, how));
        }
        let (reload_requests, reloads) = mpsc::channel(4);
        let mut admin_addr = None;
        if let Some(listener) = admin {
            let token = match config.admin.as_ref().and_then(|a| a.token_file.as_ref()) {
                Some(path) => Some(read_token(path)?),
                None => None,
            };
            admin_addr = listener.local_addr().ok();
            let state = crate::admin::AdminState {
                node: config.node.name.clone(),
                started: crate::clock::instant(),
                stats: stats.clone(),
                cluster: cluster.as_ref().map(|c| crate::admin::ClusterReadout {
                    secrets: c.secret_fingerprints(),
                    handle: c.handle.clone(),
                    problem: c.problem.clone(),
                    groups: config.groups.iter().map(|g| g.name.clone()).collect(),
                    quorum_within: config
                        .cluster
                        .as_ref()
                        .map_or(Duration::ZERO, |cc| cc.election_timeout * 2),
                }),
                mail: Some(mail),
                reload: Some(reload_requests),
                token,
                drain: drain.clone(),
            };
            if let Some(address) = admin_addr {
                tracing::info!(%address, "admin API listening");
            }
            tracker.spawn(crate::admin::serve(listener, state, cancel.child_token()));
        }
        Ok(Node {
            smtp_addrs,
            admin_addr,
            cluster,
            groups,
            stats,
            queue: queue_handle,
            health,
            live,
            drain,
            drain_follow,
            sessions,
            reloads: std::sync::Mutex::new(Some(reloads)),
            smtp_cancel,
            cancel,
            cluster_cancel,
            tracker,
            _data_dir: lock,
        })
    }

    /// The cluster side, when `[cluster]` is configured.
    pub fn cluster(&self) -> Option<&ClusterNode> {
        self.cluster.as_ref()
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
    /// before go on as they were. Returns the sections that changed, or
    /// why nothing did (a change only a restart applies).
    pub fn reload(&self, new: Config) -> Result<Vec<&'static str>, Vec<String>> {
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

/// Keep `drain` equal to whether the cluster drains node `me`.
async fn follow_drain(
    mut view: watch::Receiver<crate::cluster::raft::store::ClusterView>,
    me: u64,
    drain: Arc<watch::Sender<bool>>,
    cancel: CancellationToken,
) {
    loop {
        let now = view.borrow_and_update().state.draining.contains(&me);
        drain.send_if_modified(|d| std::mem::replace(d, now) != now);
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}

/// Keep the SMTP side's list of cluster members' addresses in step with
/// the cluster (mail they hand on gets the member allowance).
async fn follow_members(
    mut view: watch::Receiver<crate::cluster::raft::store::ClusterView>,
    clients: Arc<crate::smtp::clients::Clients>,
    cancel: CancellationToken,
) {
    loop {
        let addrs = view
            .borrow_and_update()
            .state
            .members
            .values()
            .filter_map(|m| m.member.addr.parse::<SocketAddr>().ok())
            .map(|a| a.ip().to_canonical())
            .collect();
        clients.set_members(addrs);
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}

/// The admin token: the file's content without surrounding whitespace.
fn read_token(path: &std::path::Path) -> Result<String, StartError> {
    let fail = |why: String| StartError::Token {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fail("it must hold one token without spaces".into()));
    }
    Ok(token.to_string())
}
