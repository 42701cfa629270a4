//! The stages a node starts in, in this order: bind the listeners, start
//! the cluster, start the mail side, start the groups and follow the
//! cluster, serve SMTP, serve the admin API. Each takes what the earlier
//! ones made and returns what the node keeps.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Health, StartError};
use crate::admin::{MailReadout, ReloadRequest};
use crate::cluster::node::ClusterNode;
use crate::cluster::raft::store::ClusterView;
use crate::config::{ClusterRole, Config, Live};
use crate::delivery::gate::Gate;
use crate::delivery::Destinations;
use crate::queue::intake::Intake;
use crate::queue::{self, QueueHandle, QueueParts};
use crate::resource::gate::Ready;
use crate::resource::setup::Groups;
use crate::resource::source::SourceSlot;
use crate::routing::{Handover, Router};
use crate::shadow::cluster::ClusterReplicas;
use crate::shadow::promote::{self, Mailroom, Promoter};
use crate::shadow::replicate::Settings;
use crate::shadow::{Holder, ReplicatedSpool};
use crate::smtp::clients::Clients;
use crate::smtp::{server, Accept};
use crate::spool::disk::{filesystem_space, Limits};
use crate::spool::{IdGen, QueueId, Spool};

/// What every stage shares: the configuration, the table of clients, and
/// the tokens and tracker that stop and await the tasks the stages spawn.
pub(super) struct Base {
    /// The configuration the node started with.
    pub(super) config: Arc<Config>,
    /// The configuration a reload changes.
    pub(super) live: Live,
    /// One table of client addresses for all the node's listeners, its
    /// own and its groups'.
    pub(super) clients: Arc<Clients>,
    /// Stops the mail side, SMTP and the admin API.
    pub(super) cancel: CancellationToken,
    /// Separate from `cancel`: the cluster side outlives SMTP at shutdown
    /// long enough to say goodbye.
    pub(super) cluster_cancel: CancellationToken,
    /// Every task the stages spawn.
    pub(super) tracker: TaskTracker,
}

impl Base {
    /// Nothing started yet.
    pub(super) fn new(config: Config) -> Base {
        let live = Live::new(config.clone());
        Base {
            config: Arc::new(config),
            live,
            clients: Arc::new(Clients::default()),
            cancel: CancellationToken::new(),
            cluster_cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }
}

/// The node's sockets, bound before anything starts.
pub(super) struct Listeners {
    /// The admin API's, when `[admin]` is configured.
    pub(super) admin: Option<TcpListener>,
    /// SMTP's: the configured address, the socket, and whether TLS is
    /// implicit on it.
    pub(super) smtp: Vec<(SocketAddr, TcpListener, bool)>,
}

impl Listeners {
    /// Bind first: a node that cannot listen fails before it starts
    /// delivering anything. A witness only votes: no SMTP at all.
    pub(super) async fn bind(config: &Config) -> Result<Listeners, StartError> {
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
                Some(a) => Some(TcpListener::bind(a.listen).await.map_err(|source| {
                    StartError::Listen {
                        addr: a.listen,
                        source,
                    }
                })?),
                None => None,
            };
        let implicit: &[SocketAddr] = match &config.smtp.tls {
            Some(t) if !witness => &t.implicit_listen,
            _ => &[],
        };
        let mut smtp = Vec::new();
        for (&addr, implicit) in smtp_listen
            .iter()
            .map(|a| (a, false))
            .chain(implicit.iter().map(|a| (a, true)))
        {
            let listener = server::bind(addr, config.smtp.backlog)
                .map_err(|source| StartError::Listen { addr, source })?;
            smtp.push((addr, listener, implicit));
        }
        Ok(Listeners { admin, smtp })
    }
}

/// Whether the STARTTLS certificate and key and the AUTH credentials can
/// be read.
pub(super) fn check_files(config: &Config) -> Result<(), StartError> {
    let problems = crate::smtp::check_files(&config.smtp);
    if !problems.is_empty() {
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        return Err(StartError::Tls(text.join("; ")));
    }
    Ok(())
}

/// Join or form the cluster, when `[cluster]` is configured.
pub(super) async fn start_cluster(base: &Base) -> Result<Option<ClusterNode>, StartError> {
    let config = &base.config;
    Ok(match &config.cluster {
        Some(c) => Some(
            ClusterNode::start(
                c,
                &config.node.name,
                &config.node.data_dir,
                base.cluster_cancel.clone(),
                &base.tracker,
            )
            .await?,
        ),
        None => None,
    })
}

/// Shadow copies, in a cluster: this node keeps other members' copies
/// (unless it is a witness), and its own spool copies each message to
/// other members when `[spool] replicas` is above 1.
pub(super) struct Shadows {
    /// The spool the mail side writes to: the local one, or the local
    /// one wrapped so that each message is copied before "250".
    pub(super) spool: Arc<dyn Spool>,
    /// The wrapper, when copies are made.
    pub(super) replicated: Option<Arc<ReplicatedSpool>>,
    /// Other members' copies kept here.
    pub(super) holder: Option<Holder>,
    /// The last takeover of this node's own copies it settled, and the
    /// file that keeps it (a member only).
    pub(super) settled: Option<(Arc<AtomicU64>, PathBuf)>,
}

/// How often messages short of copies are copied again.
const REPAIR_EVERY: Duration = Duration::from_secs(3);
/// How often holders are told which shadows they should keep.
const RECONCILE_EVERY: Duration = Duration::from_secs(60);

/// Keep other members' copies and copy this node's messages to them,
/// when there is a cluster and this node is not a witness.
pub(super) fn start_shadows(
    base: &Base,
    local: Arc<dyn Spool>,
    cluster: Option<&ClusterNode>,
) -> Result<Shadows, StartError> {
    let config = &base.config;
    let member = config
        .cluster
        .as_ref()
        .is_some_and(|c| c.role == ClusterRole::Member);
    let Some(c) = cluster.filter(|_| member) else {
        return Ok(Shadows {
            spool: local,
            replicated: None,
            holder: None,
            settled: None,
        });
    };
    let dir = config.node.data_dir.join("shadows");
    let fail = |source| StartError::Spool {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail(e.into()))?;
    let (total, _) = filesystem_space(&dir).map_err(|e| fail(e.into()))?;
    let holder =
        Holder::open(&dir, Limits::for_filesystem(total, config.spool.max_size)).map_err(fail)?;
    holder.admit_with(promote::admit(c.handle.view.clone(), holder.clone()));
    c.serve_shadows(Arc::new(holder.clone()));
    let settled_file = dir.join("self.settled");
    let settled = Arc::new(AtomicU64::new(promote::load_settled(&settled_file)));
    let settled = Some((settled, settled_file));
    for (primary, n) in holder.counts() {
        tracing::info!(primary = %format_args!("{primary:016x}"), shadows = n, "shadow copies recovered");
    }
    if config.spool.replicas <= 1 {
        return Ok(Shadows {
            spool: local,
            replicated: None,
            holder: Some(holder),
            settled,
        });
    }
    let replicas = ClusterReplicas::new(
        c.identity.incarnation,
        c.handle.view.clone(),
        c.link(),
        settled.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
    );
    let settings = Settings::new(config.spool.replicas, config.spool.min_replicas);
    // Progress is forwarded until the cluster side stops: after the mail
    // side, so the last results reach the holders (see Node::shutdown).
    let replicated = Arc::new(ReplicatedSpool::new(
        local,
        Arc::new(replicas),
        settings,
        base.cluster_cancel.child_token(),
    ));
    base.tracker.spawn(crate::shadow::replicate::repair::run(
        replicated.clone(),
        REPAIR_EVERY,
        RECONCILE_EVERY,
        base.cancel.child_token(),
    ));
    Ok(Shadows {
        spool: replicated.clone(),
        replicated: Some(replicated),
        holder: Some(holder),
        settled,
    })
}

/// Act on takeovers of shadow copies (a member only): take over fenced
/// nodes' copies held here, and settle takeovers of this node's own before
/// it delivers — what the answer waits for.
pub(super) fn start_promoter(
    base: &Base,
    cluster: Option<&ClusterNode>,
    shadows: &Shadows,
    mail: &Mail,
) -> Option<Ready> {
    let (c, holder, settled) = (cluster?, shadows.holder.clone()?, shadows.settled.clone()?);
    let mailroom = Mailroom {
        spool: shadows.spool.clone(),
        queue: mail.queue.clone(),
        ids: mail.ids.clone(),
    };
    let promoter = Arc::new(Promoter::new(
        c.identity.incarnation,
        c.handle.view.clone(),
        holder,
        mailroom,
        shadows.replicated.clone(),
        settled,
    ));
    base.tracker
        .spawn(promoter.clone().run(base.cancel.child_token()));
    Some(Arc::new(move || promoter.ready()))
}

/// The mail side, running: the queue, delivery behind its router, and the
/// intake SMTP hands messages to.
pub(super) struct Mail {
    /// The queue, for operators' requests.
    pub(super) queue: QueueHandle,
    /// The queue's outcome counts.
    pub(super) stats: watch::Receiver<queue::Stats>,
    /// What the watchdog probes.
    pub(super) health: Health,
    /// What the admin API shows of it.
    pub(super) readout: MailReadout,
    /// Where SMTP listeners hand messages.
    pub(super) intake: Arc<dyn Accept>,
    /// The address routes without one of their own leave from; the
    /// groups point it at their VIPs.
    pub(super) source: SourceSlot,
    /// Whether mail may leave: always alone, in a cluster only under the
    /// member's delivery lease.
    pub(super) gate: Arc<Gate>,
    /// Queue ids.
    pub(super) ids: Arc<IdGen>,
}

impl Mail {
    /// Start the queue on `spool` (what it recovered is queued at once),
    /// with delivery routed by the cluster's groups when there is one.
    pub(super) fn start(base: &Base, spool: Arc<dyn Spool>, cluster: Option<&ClusterNode>) -> Mail {
        let config = &base.config;
        // New queue ids stay above every recovered one.
        let floor = spool
            .recovered()
            .iter()
            .map(|r| r.envelope.id)
            .max()
            .unwrap_or(QueueId(0));
        let ids = Arc::new(IdGen::new(floor));
        let (results_tx, results) = mpsc::unbounded_channel();
        let member = config
            .cluster
            .as_ref()
            .is_some_and(|c| c.role == ClusterRole::Member);
        let gate = if member { Gate::shut() } else { Gate::always() };
        let destinations = Destinations::new(
            base.live.delivery(),
            config.smtp.hostname.clone(),
            spool.clone(),
            results_tx.clone(),
            base.cancel.child_token(),
            base.tracker.clone(),
            gate.clone(),
        );
        let source = SourceSlot::default();
        {
            let destinations = destinations.clone();
            source.on_withdraw(move |addr| destinations.withdraw(addr));
        }
        let handover =
            cluster.map(|c| Handover::new(c.handle.view.clone(), c.identity.incarnation, config));
        let readout = destinations.clone();
        let router = Router::new(
            source.clone(),
            handover,
            spool.clone(),
            destinations,
            results_tx,
            base.tracker.clone(),
        );
        let router = Arc::new(router.with_mx(mx_resolver(config)));
        let (stats_tx, stats) = watch::channel(queue::Stats::default());
        let queue = queue::spawn(QueueParts {
            stats: stats_tx,
            config: base.live.config(),
            spool: spool.clone(),
            dispatch: router,
            results,
            ids: ids.clone(),
            cancel: base.cancel.child_token(),
            tracker: base.tracker.clone(),
            held_file: Some(config.node.data_dir.join("spool").join("held")),
            gate: gate.clone(),
        });
        let health = Health {
            queue: queue.clone(),
            spool: spool.clone(),
        };
        let readout = MailReadout {
            queue: queue.clone(),
            spool: spool.clone(),
            destinations: readout,
            replicated: None,
        };
        let intake = Arc::new(Intake::new(
            spool,
            queue.clone(),
            ids.clone(),
            config.smtp.hostname.clone(),
        ));
        Mail {
            queue,
            stats,
            health,
            readout,
            intake,
            source,
            gate,
            ids,
        }
    }
}

/// Start the groups this node may hold (their VIPs, SMTP listeners and
/// outbound source); None without a cluster.
pub(super) fn start_groups(
    base: &Base,
    cluster: Option<&ClusterNode>,
    intake: Arc<dyn Accept>,
    outbound: (SourceSlot, Arc<Gate>, Option<Ready>),
) -> Option<Groups> {
    cluster.map(|c| {
        crate::resource::setup::start(
            &base.config,
            (base.live.smtp(), base.clients.clone()),
            c,
            intake,
            outbound,
            base.cluster_cancel.clone(),
        )
    })
}

/// The node's drain: while an operator drains the node its own listeners
/// turn new clients away; in a cluster the drain is in the replicated
/// state.
pub(super) struct Drain {
    /// True while the node's own listeners turn new clients away.
    pub(super) switch: Arc<watch::Sender<bool>>,
    /// Stops keeping `switch` in step with the cluster's drain.
    pub(super) follow: CancellationToken,
}

/// Keep the node's drain and the SMTP side's list of members in step with
/// the cluster, when there is one.
pub(super) fn follow_cluster(base: &Base, cluster: Option<&ClusterNode>) -> Drain {
    let switch = Arc::new(watch::Sender::new(false));
    // Stopped first at shutdown: leaving changes the view, and the drain
    // must not be lifted then.
    let follow = CancellationToken::new();
    if let Some(c) = cluster {
        base.tracker.spawn(follow_drain(
            c.handle.view.clone(),
            c.identity.incarnation,
            switch.clone(),
            follow.clone(),
        ));
        base.tracker.spawn(follow_members(
            c.handle.view.clone(),
            base.clients.clone(),
            base.cluster_cancel.clone(),
        ));
    }
    Drain { switch, follow }
}

/// The node's own SMTP listeners, serving.
pub(super) struct Smtp {
    /// The addresses they are bound to.
    pub(super) addrs: Vec<SocketAddr>,
    /// Their sessions, apart from other tasks: a stop waits for them to
    /// finish.
    pub(super) sessions: TaskTracker,
    /// Stops them: first at shutdown, while the queue still delivers what
    /// the groups' draining sessions accept.
    pub(super) cancel: CancellationToken,
    /// Cancelled as the stop begins: sessions between transactions get
    /// 421 at once.
    pub(super) stopping: CancellationToken,
}

/// Serve SMTP on `listeners`, handing messages to `intake`; new clients
/// are turned away while `drain` is true.
pub(super) fn serve_smtp(
    base: &Base,
    listeners: Vec<(SocketAddr, TcpListener, bool)>,
    intake: &Arc<dyn Accept>,
    drain: &watch::Sender<bool>,
) -> Smtp {
    let smtp = base.live.smtp();
    let sessions = TaskTracker::new();
    let cancel = base.cancel.child_token();
    let stopping = CancellationToken::new();
    let mut addrs = Vec::new();
    for (addr, listener, implicit) in listeners {
        let local = listener.local_addr().unwrap_or(addr);
        addrs.push(local);
        tracing::info!(address = %local, implicit_tls = implicit, "smtp listening");
        let how = server::Listener {
            cfg: smtp.clone(),
            accept: intake.clone(),
            drain: drain.subscribe(),
            away: server::Away::Resting,
            cancel: cancel.child_token(),
            stopping: stopping.clone(),
            tracker: sessions.clone(),
            implicit_tls: implicit,
            clients: base.clients.clone(),
        };
        base.tracker.spawn(server::serve_listener(listener, how));
    }
    Smtp {
        addrs,
        sessions,
        cancel,
        stopping,
    }
}

/// The admin API, serving when `[admin]` is configured.
pub(super) struct Admin {
    /// Where it listens.
    pub(super) addr: Option<SocketAddr>,
    /// Reloads asked for through it (never any without it).
    pub(super) reloads: mpsc::Receiver<ReloadRequest>,
}

/// Serve the admin API on `listener`, when there is one: it reads the
/// queue through `mail` and `stats`, the cluster through `cluster`, and
/// sets `drain`.
pub(super) fn serve_admin(
    base: &Base,
    listener: Option<TcpListener>,
    cluster: Option<&ClusterNode>,
    holder: Option<&Holder>,
    stats: &watch::Receiver<queue::Stats>,
    mail: MailReadout,
    drain: &Arc<watch::Sender<bool>>,
) -> Result<Admin, StartError> {
    let config = &base.config;
    let (reload_requests, reloads) = mpsc::channel(4);
    let mut addr = None;
    if let Some(listener) = listener {
        let token = match config.admin.as_ref().and_then(|a| a.token_file.as_ref()) {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        addr = listener.local_addr().ok();
        let state = crate::admin::AdminState {
            node: config.node.name.clone(),
            started: crate::clock::instant(),
            stats: stats.clone(),
            cluster: cluster.map(|c| crate::admin::ClusterReadout {
                secrets: c.secret_fingerprints(),
                handle: c.handle.clone(),
                problem: c.problem.clone(),
                groups: config.groups.iter().map(|g| g.name.clone()).collect(),
                quorum_within: config
                    .cluster
                    .as_ref()
                    .map_or(Duration::ZERO, |cc| cc.election_timeout * 2),
                holder: holder.cloned(),
            }),
            mail: Some(mail),
            reload: Some(reload_requests),
            token,
            drain: drain.clone(),
        };
        if let Some(address) = addr {
            tracing::info!(%address, "admin API listening");
        }
        base.tracker.spawn(crate::admin::serve(
            listener,
            state,
            base.cancel.child_token(),
        ));
    }
    Ok(Admin { addr, reloads })
}

/// Keep `drain` equal to whether the cluster drains node `me`.
async fn follow_drain(
    mut view: watch::Receiver<ClusterView>,
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
    mut view: watch::Receiver<ClusterView>,
    clients: Arc<Clients>,
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

/// The resolver of MX routes, made only when a route needs it (reading
/// /etc/resolv.conf can fail where nothing needs it). Mail that would
/// loop back here: to any address this node listens on or holds.
fn mx_resolver(config: &Config) -> Result<Arc<crate::dns::MxResolver>, String> {
    let mx =
        |r: &Arc<crate::config::Route>| matches!(r.target, crate::config::RouteTarget::Mx { .. });
    if !config.routes.iter().any(mx) {
        return Err("no route has mx = true".into());
    }
    let mut own: Vec<std::net::IpAddr> = config.smtp.listen.iter().map(|a| a.ip()).collect();
    own.extend(config.groups.iter().filter_map(|g| Some(g.vip?.addr())));
    own.retain(|ip| !ip.is_unspecified());
    let made = crate::dns::MxResolver::new(&config.dns, own).map(Arc::new);
    if let Err(e) = &made {
        tracing::error!(error = %e, "no DNS resolver: mail on MX routes waits");
    }
    made
}
