//! The admin HTTP API that `mtad ctl` talks to. Every answer is built from
//! published state (watch channels), so no request ever waits on a raft
//! round or a resource operation; the one action here (evict) runs under
//! a deadline and answers 504 when it passes.
//!
//! May import: `cluster` (through `ClusterHandle` and the replicated
//! state's types), `queue`, `delivery`, `spool`, `shadow` and the utilities
//! (`clock`, `metrics`); only the wiring (`app`, `reload`, `main`)
//! imports it.

pub mod client;
mod groups;
mod metrics;
mod queue;

pub use groups::GroupRow;
pub use queue::{Acted, MailReadout};

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::groups::handle::{ActionError, ClusterHandle};
use crate::cluster::groups::placement;
use crate::cluster::state::groups::delivery_group;
use crate::cluster::NodeState;
use crate::queue::Stats;
use crate::shadow::Holder;

/// Longest an admin action may take before it answers 504.
const ACTION_DEADLINE: Duration = Duration::from_secs(5);

/// What the API reads.
#[derive(Clone)]
pub struct AdminState {
    /// This node's name.
    pub node: String,
    /// When the node started.
    pub started: Instant,
    /// Queue counts.
    pub stats: watch::Receiver<Stats>,
    /// The cluster side, if any.
    pub cluster: Option<ClusterReadout>,
    /// The queue, if this node queues mail.
    pub mail: Option<MailReadout>,
    /// Where reloads are asked for, if the node can reload.
    pub reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
    /// The bearer token every request must carry, if one is configured.
    pub token: Option<String>,
    /// Whether an operator drains this node (set here for a node alone,
    /// from the replicated state in a cluster).
    pub drain: Arc<watch::Sender<bool>>,
}

/// A reload asked for through the admin API, with where to answer.
pub type ReloadRequest = tokio::sync::oneshot::Sender<ReloadOutcome>;

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// The sections that changed (empty: none did, or it was refused).
    pub changed: Vec<String>,
    /// Why it was refused; empty when it was applied.
    pub errors: Vec<String>,
    /// Changes the file makes that only a restart applies, each as
    /// `FILE:LINE:COL: FIELD: ...`: they keep their running values.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// What the API reads of the cluster side.
#[derive(Clone)]
pub struct ClusterReadout {
    /// Raft metrics, the applied state, calls to the leader.
    pub handle: ClusterHandle,
    /// Why this node is not (yet) in its cluster; None once it is.
    pub problem: watch::Receiver<Option<String>>,
    /// The groups this node's configuration defines.
    pub groups: Vec<String>,
    /// A leader that heard from no majority for this long has lost its
    /// quorum (two election timeouts).
    pub quorum_within: Duration,
    /// Fingerprints of the secret this node proves with, then of those it
    /// also accepts.
    pub secrets: Vec<String>,
    /// Other members' shadow copies kept here (none on a witness).
    pub holder: Option<Holder>,
}

impl ClusterReadout {
    /// Whether this node sees a working majority: as the leader, one
    /// acknowledged it lately; otherwise, it follows a leader.
    pub fn quorum(&self) -> bool {
        let m = self.handle.raft.metrics().borrow().clone();
        if m.current_leader == Some(m.id) {
            let within = self.quorum_within.as_millis() as u64;
            m.millis_since_quorum_ack.is_some_and(|ms| ms <= within)
        } else {
            m.current_leader.is_some()
        }
    }
}

/// The header on every answer of a node that sees no working majority:
/// what it answers is its last known state.
pub const NO_QUORUM: &str = "mtad-no-quorum";

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Node name.
    pub node: String,
    /// mtad version.
    pub version: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Messages queued now.
    pub queued: usize,
    /// Recipients delivered since start.
    pub delivered: u64,
    /// Deferrals since start.
    pub deferred: u64,
    /// Bounces since start.
    pub bounced: u64,
    /// Expiries since start.
    pub expired: u64,
    /// "single", "leader", "follower", "learner", "candidate".
    pub cluster_role: String,
    /// The leader's name, when known.
    pub leader: Option<String>,
    /// Why this node is not (yet) in its cluster (a refused join says
    /// why); absent when it is, or runs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_problem: Option<String>,
    /// Groups this node owns now.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Whether the node sees a working majority (absent for a single
    /// node); without one, cluster fields are its last known state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<bool>,
    /// "draining" while an operator drains the node, "drained" once it
    /// owns no group and its queue is empty; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<String>,
    /// Fingerprints of the cluster secret this node proves with, then of
    /// those it also accepts (empty for a single node): nodes agree when
    /// they can talk, and a change of secret shows here node by node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Messages queued here with fewer copies on other members than
    /// `[spool] replicas` (absent when this node makes no copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underreplicated: Option<usize>,
}

/// One row of `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRow {
    /// Name.
    pub name: String,
    /// Incarnation (raft id).
    pub incarnation: u64,
    /// "member" or "witness".
    pub role: String,
    /// "voter", "non-voter", or "changing" while a membership change
    /// between two voter sets is under way and the node is in only one.
    pub vote: String,
    /// up, suspect or down, as the leader published it.
    pub state: String,
    /// Whether it leads.
    pub leader: bool,
    /// Cluster address.
    pub addr: String,
    /// When the state last changed (ms since the epoch; 0 unknown).
    pub since_ms: u64,
    /// Whether it may deliver mail: it holds a live epoch of its delivery
    /// group (a witness never does).
    #[serde(default)]
    pub delivers: bool,
    /// Shadow copies of its messages this node keeps.
    #[serde(default)]
    pub shadows_here: usize,
    /// Copies of this node's messages it keeps, as this node recorded.
    #[serde(default)]
    pub copies_there: usize,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    /// What went wrong, for a person.
    pub error: String,
}

type Answer<T> = Result<Json<T>, (StatusCode, Json<Problem>)>;

fn problem<T>(code: StatusCode, error: impl Into<String>) -> Answer<T> {
    Err((
        code,
        Json(Problem {
            error: error.into(),
        }),
    ))
}

/// Serve the API on `listener` until `cancel`.
pub async fn serve(listener: TcpListener, state: AdminState, cancel: CancellationToken) {
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{name}/evict", post(evict))
        .route("/v1/nodes/{name}/drain", post(drain))
        .route("/v1/nodes/{name}/undrain", post(undrain))
        .route("/v1/groups", get(groups::list))
        .route("/v1/groups/{name}/move/{node}", post(groups::move_to))
        .route("/metrics", get(metrics::scrape))
        .route("/v1/reload", post(reload))
        .route("/v1/queue", get(queue::list))
        .route("/v1/queue/summary", get(queue::summary))
        .route("/v1/queue/{id}", get(queue::show))
        .route("/v1/queue/{id}", post(queue::act))
        .layer(axum::middleware::from_fn_with_state(
            state.cluster.clone().map(Arc::new),
            flag_no_quorum,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.token.clone().map(Arc::new),
            authorize,
        ))
        .with_state(Arc::new(state));
    let shutdown = async move { cancel.cancelled().await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "admin API stopped");
    }
}

async fn status(State(s): State<Arc<AdminState>>) -> Json<Status> {
    let q = *s.stats.borrow();
    let mut owned = Vec::new();
    let (cluster_role, leader, cluster_problem) = match &s.cluster {
        None => ("single".to_string(), None, None),
        Some(c) => {
            let m = c.handle.raft.metrics().borrow().clone();
            let v = c.handle.view.borrow();
            let leader = m
                .current_leader
                .and_then(|id| v.state.members.get(&id).map(|ms| ms.member.name.clone()));
            let problem = c.problem.borrow().clone();
            owned = placement::owned(&v.state).remove(&m.id).unwrap_or_default();
            (format!("{:?}", m.state).to_lowercase(), leader, problem)
        }
    };
    Json(Status {
        node: s.node.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_s: s.started.elapsed().as_secs(),
        queued: q.queued,
        delivered: q.delivered,
        deferred: q.deferred,
        bounced: q.bounced,
        expired: q.expired,
        cluster_role,
        leader,
        cluster_problem,
        groups: owned.clone(),
        quorum: s.cluster.as_ref().map(|c| c.quorum()),
        secrets: s
            .cluster
            .as_ref()
            .map(|c| c.secrets.clone())
            .unwrap_or_default(),
        drain: match *s.drain.borrow() {
            false => None,
            true if owned.is_empty() && q.queued == 0 => Some("drained".into()),
            true => Some("draining".into()),
        },
        underreplicated: replicated(&s).map(|r| r.underreplicated().len()),
    })
}

async fn nodes(State(s): State<Arc<AdminState>>) -> Answer<Vec<NodeRow>> {
    let Some(ClusterReadout { handle, .. }) = &s.cluster else {
        return problem(StatusCode::NOT_FOUND, "this node runs alone: no cluster");
    };
    let (raft, view) = (&handle.raft, &handle.view);
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let configs = membership.get_joint_config();
    let in_all = |id: &u64| configs.iter().all(|c| c.contains(id));
    let in_any = |id: &u64| configs.iter().any(|c| c.contains(id));
    let state = view.borrow().state.clone();
    let here = s
        .cluster
        .as_ref()
        .and_then(|c| c.holder.as_ref())
        .map(|h| h.counts())
        .unwrap_or_default();
    let there = replicated(&s)
        .map(|r| r.shadows_per_holder())
        .unwrap_or_default();
    let rows = membership
        .nodes()
        .map(|(id, member)| {
            let known = state.members.get(id);
            NodeRow {
                name: member.name.clone(),
                incarnation: *id,
                role: member.role.to_string(),
                vote: if in_all(id) {
                    "voter"
                } else if in_any(id) {
                    "changing"
                } else {
                    "non-voter"
                }
                .into(),
                state: known.map_or(NodeState::Up, |k| k.state).to_string(),
                leader: m.current_leader == Some(*id),
                addr: member.addr.clone(),
                since_ms: known.map_or(0, |k| k.since_ms),
                delivers: state
                    .groups
                    .get(&delivery_group(&member.name))
                    .is_some_and(|g| g.owner == Some(*id) && !g.revoked && !g.released),
                shadows_here: here.get(id).copied().unwrap_or(0),
                copies_there: there.get(id).copied().unwrap_or(0),
            }
        })
        .collect();
    Ok(Json(rows))
}

/// This node's copies on other members, when it makes any.
fn replicated(s: &AdminState) -> Option<&Arc<crate::shadow::ReplicatedSpool>> {
    s.mail.as_ref().and_then(|m| m.replicated.as_ref())
}

/// Member `id`'s name, or its id in hex when the state does not know it.
fn node_name(s: &AdminState, id: u64) -> String {
    let name = s.cluster.as_ref().and_then(|c| {
        let v = c.handle.view.borrow();
        v.state.members.get(&id).map(|m| m.member.name.clone())
    });
    name.unwrap_or_else(|| format!("{id:016x}"))
}

async fn evict(
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Answer<serde_json::Value> {
    let Some(ClusterReadout { handle, .. }) = &s.cluster else {
        return problem(StatusCode::NOT_FOUND, "this node runs alone: no cluster");
    };
    match handle.evict(&name, ACTION_DEADLINE).await {
        Ok(()) => Ok(Json(serde_json::json!({ "evicted": name }))),
        Err(e) => refused(e),
    }
}

/// An operator's action the cluster did not carry out, as an HTTP problem.
fn refused<T>(e: ActionError) -> Answer<T> {
    let status = match e {
        ActionError::NoSuchMember(_) => StatusCode::NOT_FOUND,
        ActionError::NotLeader | ActionError::EvictSelf => StatusCode::CONFLICT,
        ActionError::Unavailable(_) | ActionError::Failed(_) => StatusCode::SERVICE_UNAVAILABLE,
        ActionError::TimedOut => StatusCode::GATEWAY_TIMEOUT,
    };
    problem(status, e.to_string())
}

/// `POST /v1/reload`: what changed, or 400 with every reason it did not.
async fn reload(State(s): State<Arc<AdminState>>) -> Answer<ReloadOutcome> {
    let Some(requests) = &s.reload else {
        return problem(StatusCode::NOT_FOUND, "this node cannot reload");
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let asked = async {
        requests.send(tx).await.ok()?;
        rx.await.ok()
    };
    match tokio::time::timeout(ACTION_DEADLINE, asked).await {
        Ok(Some(o)) if o.errors.is_empty() => Ok(Json(o)),
        Ok(Some(o)) => problem(
            StatusCode::BAD_REQUEST,
            format!(
                "reload refused, the running configuration stays:\n{}",
                o.errors.join("\n")
            ),
        ),
        Ok(None) => problem(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping"),
        Err(_) => problem(
            StatusCode::GATEWAY_TIMEOUT,
            "the reload did not finish in time",
        ),
    }
}

/// With a token configured, refuse (401) a request without it.
async fn authorize(
    State(token): State<Option<Arc<String>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(token) = token {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.as_bytes(), token.as_bytes()) {
            let error = "missing or wrong bearer token (mtad ctl --token-file FILE)".to_string();
            return (StatusCode::UNAUTHORIZED, Json(Problem { error })).into_response();
        }
    }
    next.run(req).await
}

/// Compare in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Mark every answer of a node without a working majority.
async fn flag_no_quorum(
    State(cluster): State<Option<Arc<ClusterReadout>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut res = next.run(req).await;
    if cluster.is_some_and(|c| !c.quorum()) {
        let v = axum::http::HeaderValue::from_static("last known state");
        res.headers_mut().insert(NO_QUORUM, v);
    }
    res
}

/// `POST /v1/nodes/{name}/drain`: the node takes no new mail (421), hands
/// its groups to other nodes, and delivers or hands over its queue;
/// `status` on it then says "drained".
async fn drain(state: State<Arc<AdminState>>, name: Path<String>) -> Answer<serde_json::Value> {
    set_drain(state, name, true).await
}

/// `POST /v1/nodes/{name}/undrain`: end a drain.
async fn undrain(state: State<Arc<AdminState>>, name: Path<String>) -> Answer<serde_json::Value> {
    set_drain(state, name, false).await
}

async fn set_drain(
    State(s): State<Arc<AdminState>>,
    Path(name): Path<String>,
    draining: bool,
) -> Answer<serde_json::Value> {
    let done = || {
        Ok(Json(
            serde_json::json!({ "node": name, "draining": draining }),
        ))
    };
    let Some(ClusterReadout { handle, .. }) = &s.cluster else {
        if name != s.node {
            return problem(
                StatusCode::NOT_FOUND,
                format!("this node is {}, not {name}", s.node),
            );
        }
        s.drain.send_replace(draining);
        return done();
    };
    match handle.set_drain(&name, draining, ACTION_DEADLINE).await {
        Ok(()) => done(),
        Err(e) => refused(e),
    }
}
