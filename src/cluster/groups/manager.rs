//! The leader's group manager: every tick, while this node leads, it asks
//! [`placement::decide`] about each configured group and carries the
//! answer out — assigning the next epoch, revoking the current one, or
//! asking the voters how long their grants for a revoked epoch may last
//! and waiting until they have certainly run out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::handle::ClusterHandle;
use super::lease;
use super::placement::{decide, Decision, Policy};
use crate::clock::now_ms;
use crate::cluster::rpc::group::{GroupReply, GroupRequest};
use crate::cluster::state::groups::{delivery_node, GroupCommand};
use crate::cluster::state::{ClusterState, Command, NodeId, NodeState, Response, Role};

/// A group as the leader needs to know it.
#[derive(Debug, Clone)]
pub struct GroupPolicy {
    /// Its name.
    pub name: String,
    /// Preferred node names, in order.
    pub preferred: Vec<String>,
    /// Move back to a more preferred node.
    pub failback: bool,
    /// Its lease length (sets the clock margin).
    pub lease: Duration,
    /// How long a handover may take on the owner: drain and stop.
    pub handover: Duration,
}

/// A handover's length when no member declared it: the default drain and
/// stop timeouts.
const DEFAULT_HANDOVER: Duration = Duration::from_secs(35);

/// Answers about one revoked epoch: per voter, the latest instant its
/// grants may last.
#[derive(Default)]
struct Revocation {
    epoch: u64,
    answers: BTreeMap<NodeId, Instant>,
    asking: bool,
    /// When the last round went out: rounds are spaced, so that voters
    /// that cannot answer yet (or at all) do not make the leader spin.
    asked: Option<Instant>,
}

type Revocations = Arc<Mutex<HashMap<String, Revocation>>>;

/// Run until `cancel`: every `period`, while leading, manage `groups` —
/// and any other group already in the cluster state, which some other
/// node's configuration defines and declared (a witness may lead without
/// defining any): those are placed as declared.
pub async fn run(
    cluster: ClusterHandle,
    groups: Vec<GroupPolicy>,
    period: Duration,
    cancel: CancellationToken,
) {
    let revocations: Revocations = Arc::default();
    let answered = Arc::new(Notify::new());
    let mut view = cluster.view.clone();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Besides the tick, a change of state (say, an owner published down),
    // voters' answers, and the moment a revoked group is free all wake the
    // manager at once: every step of a failover is on its critical path.
    let mut due: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            changed = view.changed() => if changed.is_err() { return },
            _ = answered.notified() => {}
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
        }
        due = None;
        if !cluster.leads() {
            // A new leader asks afresh: answers are only good for who asked.
            lock(&revocations).clear();
            continue;
        }
        // Until every member has its record (the failure detector writes
        // the bootstrapper's on its first round), a placement would pass
        // over a node that is there.
        let members: Vec<NodeId> = {
            let m = cluster.raft.metrics().borrow().clone();
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect()
        };
        let recorded = {
            let v = cluster.view.borrow();
            members.iter().all(|id| v.state.members.contains_key(id))
        };
        if !recorded {
            continue;
        }
        let others: Vec<GroupPolicy> = cluster
            .view
            .borrow()
            .state
            .groups
            .iter()
            .filter(|(name, _)| groups.iter().all(|g| g.name != **name))
            .map(|(name, g)| GroupPolicy {
                name: name.clone(),
                preferred: g.preferred.clone(),
                failback: g.failback,
                // Unknown: the longest, for the widest clock margin.
                lease: match g.lease_ms {
                    0 => lease::MAX_LEASE,
                    ms => Duration::from_millis(ms),
                },
                handover: Duration::ZERO,
            })
            .collect();
        let all: Vec<GroupPolicy> = groups.iter().cloned().chain(others).collect();
        for p in &all {
            if let Some(at) = manage(&cluster, p, &revocations, &answered, period).await {
                due = Some(due.map_or(at, |d| d.min(at)));
            }
        }
    }
}

fn lock(r: &Revocations) -> std::sync::MutexGuard<'_, HashMap<String, Revocation>> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// Room for clocks that run at slightly different rates.
fn margin(lease: Duration) -> Duration {
    Duration::from_millis(25) + lease / 50
}

/// Manage one group; returns when it wants to be looked at again (a
/// revoked group becoming free).
async fn manage(
    cluster: &ClusterHandle,
    p: &GroupPolicy,
    revocations: &Revocations,
    answered: &Arc<Notify>,
    period: Duration,
) -> Option<Instant> {
    let state = cluster.view.borrow().state.clone();
    let epoch = state.groups.get(&p.name).map_or(0, |g| g.epoch);
    let free_at = {
        let r = lock(revocations);
        r.get(&p.name).filter(|r| r.epoch == epoch).and_then(|r| {
            let configs = cluster.lease_configs(&p.name);
            lease::free_at(&configs, &r.answers, margin(p.lease))
        })
    };
    let free = free_at.is_some_and(|at| Instant::now() >= at);
    // The longest of what this node and the declaring member configured.
    let declared = state.groups.get(&p.name).map_or(0, |g| g.handover_ms);
    let handover = match p.handover.max(Duration::from_millis(declared)) {
        Duration::ZERO => DEFAULT_HANDOVER,
        d => d,
    } + p.lease;
    let policy = Policy {
        name: &p.name,
        preferred: &p.preferred,
        failback: p.failback,
        handover_ms: handover.as_millis() as u64,
        now_ms: now_ms(),
    };
    let cmd = match decide(policy, &state, free) {
        Decision::Keep => return None,
        Decision::AwaitGrants => {
            let next = ask(cluster, &p.name, epoch, revocations, answered, period);
            return match (free_at, next) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Decision::Assign { owner, reason } => GroupCommand::Assign {
            group: p.name.clone(),
            epoch: epoch + 1,
            owner: Some(owner),
            reason,
            at_ms: now_ms(),
            takers: takers(&state, &p.name, Some(owner)),
        },
        Decision::Unplace { reason } => GroupCommand::Assign {
            group: p.name.clone(),
            epoch: epoch + 1,
            owner: None,
            reason,
            at_ms: now_ms(),
            takers: takers(&state, &p.name, None),
        },
        Decision::Revoke { reason } => GroupCommand::Revoke {
            group: p.name.clone(),
            epoch,
            reason,
            at_ms: now_ms(),
        },
        Decision::Drain { reason } => GroupCommand::Drain {
            group: p.name.clone(),
            epoch,
            reason,
            at_ms: now_ms(),
        },
    };
    let what = format!("{cmd:?}");
    match cluster.raft.client_write(Command::Group(cmd)).await {
        Ok(r) if r.data == Response::Done => {
            let g = cluster.view.borrow().state.groups.get(&p.name).cloned();
            if let Some(g) = g {
                tracing::info!(
                    group = %p.name,
                    epoch = g.epoch,
                    owner = ?g.owner.map(|o| format!("{o:x}")),
                    revoked = g.revoked,
                    reason = %g.reason,
                    "group changed"
                );
            }
        }
        Ok(r) => {
            tracing::debug!(group = %p.name, result = ?r.data, %what, "group change not applied")
        }
        Err(e) => tracing::debug!(group = %p.name, error = %e, "group change not written"),
    }
    None
}

/// Who takes over the shadow copies of the member whose delivery group
/// `group` goes to `next` (if its epoch is taken from it: see
/// `GroupCommand::Assign`): every full member up (or only suspected of
/// being down) now but that one.
fn takers(state: &ClusterState, group: &str, next: Option<NodeId>) -> BTreeSet<NodeId> {
    let Some(g) = state
        .groups
        .get(group)
        .filter(|_| delivery_node(group).is_some())
    else {
        return BTreeSet::new();
    };
    state
        .members
        .iter()
        .filter(|(id, m)| {
            Some(**id) != g.owner
                && Some(**id) != next
                && matches!(m.state, NodeState::Up | NodeState::Suspect)
                && m.member.role == Role::Member
        })
        .map(|(id, _)| *id)
        .collect()
}

/// Ask every voter, in the background, how long its grants for the
/// revoked `epoch` may last; one round at a time per group, spaced by a
/// quarter period. Returns when the next round may go out, if this one
/// could not.
fn ask(
    cluster: &ClusterHandle,
    group: &str,
    epoch: u64,
    revocations: &Revocations,
    answered: &Arc<Notify>,
    period: Duration,
) -> Option<Instant> {
    {
        let mut r = lock(revocations);
        let rev = r.entry(group.to_string()).or_default();
        if rev.epoch != epoch {
            *rev = Revocation {
                epoch,
                ..Revocation::default()
            };
        }
        if rev.asking {
            return None;
        }
        let spacing = period / 4;
        if let Some(at) = rev.asked.filter(|at| at.elapsed() < spacing) {
            return Some(at + spacing);
        }
        rev.asking = true;
        rev.asked = Some(Instant::now());
    }
    let voters: BTreeSet<NodeId> = cluster.lease_configs(group).into_iter().flatten().collect();
    let (cluster, group, revocations) = (cluster.clone(), group.to_string(), revocations.clone());
    let answered = answered.clone();
    tokio::spawn(async move {
        let mut asks = tokio::task::JoinSet::new();
        for v in voters {
            let req = GroupRequest::Outstanding {
                group: group.clone(),
                epoch,
            };
            let cluster = cluster.clone();
            asks.spawn(async move { (v, cluster.call(v, req, period).await) });
        }
        let answers = asks.join_all().await;
        let mut r = lock(&revocations);
        let Some(rev) = r.get_mut(&group).filter(|r| r.epoch == epoch) else {
            return;
        };
        rev.asking = false;
        let now = Instant::now();
        for (voter, answer) in answers {
            if let Ok(GroupReply::Outstanding {
                remaining_ms: Some(ms),
            }) = answer
            {
                // Measured from when the answer arrived: the grants end no
                // later than that plus what the voter said remained.
                let end = now + Duration::from_millis(ms);
                rev.answers.entry(voter).or_insert(end);
            }
        }
        drop(r);
        answered.notify_one();
    });
    None
}
