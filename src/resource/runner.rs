//! The driver of one group on one node: it feeds the pure [`Machine`]
//! with the replicated state, the lease it collects from the voters, and
//! the outcome of resource operations, and carries out what it decides.
//! Operations run in tasks of their own under deadlines; reports to the
//! leader go out one at a time, in order, from a task of their own; so
//! nothing here ever waits on a resource or on the network.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::machine::{Action, Event, Machine, Op, Phase, Settings};
use super::{run_op, Resource};
use crate::clock::now_ms;
use crate::cluster::groups::handle::ClusterHandle;
use crate::cluster::groups::lease::Holding;
use crate::cluster::rpc::group::{GroupReply, GroupRequest, Refusal};
use crate::cluster::state::groups::GroupCommand;
use crate::cluster::state::NodeId;
use crate::config::GroupConfig;

/// What this owner told the leader about the memberships it counts in.
#[derive(Debug, Default)]
struct Counting {
    /// The epoch it was told for.
    epoch: u64,
    /// The membership's log index (0: nothing told yet).
    sent: u64,
    /// When.
    sent_at: Option<Instant>,
}

/// The longest pause between attempts to get a report to the leader.
const REPORT_PAUSE_MAX: Duration = Duration::from_secs(2);
/// Pause before claiming again resources another host still holds (the
/// claim itself listens for a while).
const CLAIM_RETRY: Duration = Duration::from_millis(50);
/// How long one claim may take.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before trying again a stop that failed.
const STOP_RETRY: Duration = Duration::from_secs(1);

/// One group on this node.
pub struct GroupRunner {
    cfg: GroupConfig,
    resources: Vec<Arc<dyn Resource>>,
    cluster: ClusterHandle,
}

impl GroupRunner {
    /// A runner for `cfg` with its resources in start order.
    pub fn new(
        cfg: GroupConfig,
        resources: Vec<Arc<dyn Resource>>,
        cluster: ClusterHandle,
    ) -> GroupRunner {
        GroupRunner {
            cfg,
            resources,
            cluster,
        }
    }

    fn settings(&self) -> Settings {
        Settings {
            check_interval: self.cfg.check_interval,
            start_timeout: self.cfg.start_timeout,
            max_restarts: self.cfg.max_restarts,
            restart_window: self.cfg.restart_window,
            // Room to stop before the lease could run out: a quarter of it.
            stop_margin: self.cfg.lease / 4,
            claim_retry: CLAIM_RETRY,
            stop_retry: STOP_RETRY,
        }
    }

    /// This node's view of the group; a node that is leaving hands its
    /// groups over as if the leader had asked.
    fn view(&self, leaving: bool) -> Event {
        let v = self.cluster.view.borrow();
        let g = v
            .state
            .groups
            .get(&self.cfg.name)
            .cloned()
            .unwrap_or_default();
        Event::View {
            ours: g.owner == Some(self.cluster.me.incarnation),
            epoch: g.epoch,
            live: !g.revoked && !g.released,
            draining: g.draining || leaving,
        }
    }

    /// Run until `cancel`; then hand the group over as if the leader had
    /// asked — drain under a lease still renewed, stop, release — so the
    /// leader can place it at once, and return.
    pub async fn run(self, cancel: CancellationToken) {
        let mut m = Machine::new(self.settings());
        let (done_tx, mut done) = mpsc::unbounded_channel::<(Op, Result<(), String>)>();
        let (grant_tx, mut grants) = mpsc::unbounded_channel::<(u64, NodeId, Instant, Duration)>();
        let (reports, reporter) = self.reporter();
        let mut view = self.cluster.view.clone();
        let mut holding = Holding::default();
        let mut holding_epoch = 0;
        let mut renew = tokio::time::interval(self.cfg.lease / 4);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut leaving, mut view_open) = (false, true);
        let mut next = Some(self.view(leaving));
        let mut asked: Option<u64> = None;
        let mut asked_membership = 0;
        let mut counting = Counting::default();
        let declaring = tokio::spawn(declare(self.cluster.clone(), self.cfg.clone()));
        loop {
            if let Some(ev) = next.take() {
                self.tell_lease(&ev);
                for action in m.on(ev, Instant::now()) {
                    self.act(action, &m, &done_tx, &reports);
                }
            }
            // Once the lease holds in a newer membership, count in it
            // alone from now on (the machine hears the lease as it then
            // stands before anything else happens).
            if let Some(lease) = self.count_in(&mut counting, &holding, &reports) {
                self.tell_lease(&lease);
                for action in m.on(lease, Instant::now()) {
                    self.act(action, &m, &done_tx, &reports);
                }
            }
            if leaving
                && !m.busy()
                && matches!(m.phase(), Phase::Idle | Phase::Done | Phase::Fenced)
            {
                break;
            }
            // Newly ours (or a new epoch), or voters changed: ask the
            // voters at once rather than at the next renewal tick — this
            // is on the failover path, and a new majority's grants let the
            // owner move on from the old voters (see count_in).
            let membership = self.cluster.view.borrow().state.voters.last();
            if m.renewing() != asked || membership != asked_membership {
                asked = m.renewing();
                asked_membership = membership;
                self.ask_voters(&m, &mut holding, &mut holding_epoch, &grant_tx, &counting);
                renew.reset();
            }
            let wake = m.next_wake();
            next = Some(tokio::select! {
                _ = cancel.cancelled(), if !leaving => {
                    leaving = true;
                    self.view(leaving)
                }
                changed = view.changed(), if view_open => {
                    // The cluster is gone: nothing more to learn; leave.
                    view_open = changed.is_ok();
                    leaving |= !view_open;
                    self.view(leaving)
                }
                Some((op, result)) = done.recv() => Event::Done(op, result),
                Some((epoch, voter, sent, ttl)) = grants.recv() => {
                    if epoch == holding_epoch {
                        holding.granted(voter, sent, ttl);
                    }
                    Event::Lease(holding.valid_in_any(&self.owner_configs(&counting)))
                }
                _ = renew.tick() => {
                    self.ask_voters(&m, &mut holding, &mut holding_epoch, &grant_tx, &counting);
                    Event::Lease(holding.valid_in_any(&self.owner_configs(&counting)))
                }
                _ = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => Event::Tick,
            });
        }
        declaring.abort();
        tracing::info!(group = %self.cfg.name, phase = ?m.phase(), "group runner stopped");
        // The last report (offline: released) should reach the leader
        // before the node leaves, but never holds the shutdown for long.
        drop(reports);
        let _ = tokio::time::timeout(self.cfg.stop_timeout, reporter).await;
    }

    /// Resources learn every lease first: what they keep up must not
    /// outlast it (see [`Resource::lease`]).
    fn tell_lease(&self, ev: &Event) {
        if let Event::Lease(Some(until)) = ev {
            for r in &self.resources {
                r.lease(*until);
            }
        }
    }

    fn act(
        &self,
        action: Action,
        m: &Machine,
        done: &mpsc::UnboundedSender<(Op, Result<(), String>)>,
        reports: &mpsc::UnboundedSender<GroupCommand>,
    ) {
        let group = &self.cfg.name;
        let epoch = self.epoch();
        match action {
            Action::Claim => {
                let deadline = Instant::now() + CLAIM_TIMEOUT;
                self.spawn_op(Op::Claim, deadline, false, done);
            }
            Action::Start { deadline } => {
                tracing::info!(%group, epoch, "starting the group's resources");
                self.spawn_op(Op::Start, deadline, false, done);
            }
            Action::Stop { graceful } => {
                tracing::info!(%group, epoch, graceful, phase = ?m.phase(), "stopping the group's resources");
                let deadline = Instant::now() + self.stop_budget(graceful);
                self.spawn_op(Op::Stop, deadline, graceful, done);
            }
            Action::Hurry => {
                tracing::warn!(%group, epoch, "the lease got short: ending the drain now");
                for r in &self.resources {
                    r.hurry();
                }
            }
            Action::Check => {
                let deadline = Instant::now() + self.cfg.check_timeout;
                self.spawn_op(Op::Check, deadline, false, done);
            }
            // For the epoch the machine acted under, which may be older
            // than the view's: a late report must not end a newer one.
            Action::Report(epoch, status, reason) => {
                tracing::info!(%group, epoch, %status, %reason, "group status");
                let _ = reports.send(GroupCommand::Report {
                    group: group.clone(),
                    epoch,
                    node: self.cluster.me.incarnation,
                    status,
                    reason,
                    at_ms: now_ms(),
                });
            }
            Action::Fence(reason) => {
                tracing::error!(%group, epoch, %reason, "fencing this node for the group; stopping again until done");
                let _ = reports.send(self.fence(true, reason));
            }
            Action::Unfence => {
                let reason = "the stop that failed has succeeded".to_string();
                tracing::warn!(%group, epoch, %reason, "lifting this node's fence for the group");
                let _ = reports.send(self.fence(false, reason));
            }
        }
    }

    fn fence(&self, fenced: bool, reason: String) -> GroupCommand {
        GroupCommand::Fence {
            group: self.cfg.name.clone(),
            node: self.cluster.me.incarnation,
            fenced,
            reason,
            at_ms: now_ms(),
        }
    }

    /// The voter configurations this owner counts its lease in: those
    /// since the membership it last told the leader about (or the one the
    /// state records, if later), and those in force now. Holding a
    /// majority of any one of them is enough: the leader, to free the
    /// group, hears from a majority of every one (see
    /// [`crate::cluster::state::history`]).
    fn owner_configs(&self, counting: &Counting) -> Vec<BTreeSet<NodeId>> {
        let recorded = {
            let v = self.cluster.view.borrow();
            v.state
                .groups
                .get(&self.cfg.name)
                .map_or(0, |g| g.counted_since)
        };
        self.cluster
            .applied_configs_since(recorded.max(counting.sent))
    }

    /// When the lease holds in the newest membership alone, tell the
    /// leader this owner counts from there on (so it stops asking older
    /// voter sets), and return the lease as it then stands. A report lost
    /// on the way is sent again now and then.
    fn count_in(
        &self,
        counting: &mut Counting,
        holding: &Holding,
        reports: &mpsc::UnboundedSender<GroupCommand>,
    ) -> Option<Event> {
        let (epoch, recorded, newest) = {
            let v = self.cluster.view.borrow();
            let g = v.state.groups.get(&self.cfg.name)?;
            let ours = g.owner == Some(self.cluster.me.incarnation) && !g.released && !g.revoked;
            if !ours {
                return None;
            }
            (g.epoch, g.counted_since, v.state.voters.last())
        };
        if counting.epoch != epoch {
            *counting = Counting {
                epoch,
                ..Counting::default()
            };
        }
        let report = |since| GroupCommand::Counting {
            group: self.cfg.name.clone(),
            epoch,
            node: self.cluster.me.incarnation,
            since,
        };
        if newest > recorded.max(counting.sent) {
            let configs = self.cluster.applied_configs_since(newest);
            let lease = holding
                .valid_in_any(&configs)
                .filter(|until| *until > Instant::now())?;
            counting.sent = newest;
            counting.sent_at = Some(Instant::now());
            tracing::info!(group = %self.cfg.name, epoch, since = newest, "lease counted in the newest membership");
            let _ = reports.send(report(newest));
            return Some(Event::Lease(Some(lease)));
        }
        let lost = recorded < counting.sent
            && counting
                .sent_at
                .is_some_and(|t| t.elapsed() >= self.cfg.lease);
        if lost {
            counting.sent_at = Some(Instant::now());
            let _ = reports.send(report(counting.sent));
        }
        None
    }

    fn epoch(&self) -> u64 {
        let v = self.cluster.view.borrow();
        v.state.groups.get(&self.cfg.name).map_or(0, |g| g.epoch)
    }

    fn stop_budget(&self, graceful: bool) -> Duration {
        if graceful {
            self.cfg.drain_timeout + self.cfg.stop_timeout
        } else {
            self.cfg.stop_timeout
        }
    }

    /// Run `op` over every resource in a task of its own: claims and
    /// starts in order (the first failure ends it) by `deadline`; checks
    /// all by `deadline`; a stop drains first if `graceful` (all in reverse
    /// order, until the drain time is up or hurried), then stops all in
    /// start order — the address first, so it is gone before anything else
    /// is tidied — each within the stop timeout, the first failure
    /// reported.
    fn spawn_op(
        &self,
        op: Op,
        deadline: Instant,
        graceful: bool,
        done: &mpsc::UnboundedSender<(Op, Result<(), String>)>,
    ) {
        let resources = self.resources.clone();
        let done = done.clone();
        let stop_timeout = self.cfg.stop_timeout;
        tokio::spawn(async move {
            let result = match op {
                Op::Claim | Op::Start => {
                    let mut r = Ok(());
                    for res in &resources {
                        let run = if op == Op::Claim {
                            res.claim()
                        } else {
                            res.start()
                        };
                        r = run_op(res.name(), run, deadline).await;
                        if r.is_err() {
                            break;
                        }
                    }
                    r
                }
                Op::Stop => {
                    if graceful {
                        // Every resource drains at once; a drain's failure
                        // is no reason to keep anything up.
                        let until = deadline - stop_timeout;
                        let drains = resources
                            .iter()
                            .rev()
                            .map(|res| run_op(res.name(), res.drain(), until));
                        for r in futures_util::future::join_all(drains).await {
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "drain");
                            }
                        }
                    }
                    // Each resource gets the whole stop timeout: one slow to
                    // stop must not leave the next no time at all.
                    let mut r = Ok(());
                    for res in &resources {
                        let until = Instant::now() + stop_timeout;
                        r = r.and(run_op(res.name(), res.stop(), until).await);
                    }
                    r
                }
                Op::Check => {
                    let mut r = Ok(());
                    for res in &resources {
                        r = r.and(run_op(res.name(), res.check(), deadline).await);
                    }
                    r
                }
            };
            let _ = done.send((op, result));
        });
    }

    /// Renew the lease for the epoch the machine holds, if any (grants of
    /// an earlier epoch are forgotten).
    fn ask_voters(
        &self,
        m: &Machine,
        holding: &mut Holding,
        holding_epoch: &mut u64,
        grants: &mpsc::UnboundedSender<(u64, NodeId, Instant, Duration)>,
        counting: &Counting,
    ) {
        if let Some(epoch) = m.renewing() {
            if epoch != *holding_epoch {
                holding.clear();
                *holding_epoch = epoch;
            }
            // Voters of the memberships it counts in, and of one appended
            // but not yet applied, so their grants are there when it is.
            let mut voters: BTreeSet<NodeId> =
                self.owner_configs(counting).into_iter().flatten().collect();
            voters.extend(self.cluster.voter_configs().into_iter().flatten());
            self.renew(epoch, voters, grants);
        }
    }

    /// Ask `voters` for a grant under `epoch`; each answer comes back on
    /// `grants` with the time the request was sent.
    fn renew(
        &self,
        epoch: u64,
        voters: BTreeSet<NodeId>,
        grants: &mpsc::UnboundedSender<(u64, NodeId, Instant, Duration)>,
    ) {
        for voter in voters {
            let (cluster, grants) = (self.cluster.clone(), grants.clone());
            let req = GroupRequest::Grant {
                group: self.cfg.name.clone(),
                epoch,
                ttl_ms: self.cfg.lease.as_millis() as u64,
            };
            let timeout = self.cfg.lease / 4;
            tokio::spawn(async move {
                let sent = Instant::now();
                match cluster.call(voter, req, timeout).await {
                    Ok(GroupReply::Granted { ttl_ms }) => {
                        let _ = grants.send((epoch, voter, sent, Duration::from_millis(ttl_ms)));
                    }
                    Ok(other) => {
                        tracing::debug!(voter = %format!("{voter:x}"), answer = ?other, "no grant")
                    }
                    Err(e) => {
                        tracing::debug!(voter = %format!("{voter:x}"), error = %e, "no grant")
                    }
                }
            });
        }
    }

    /// A task that sends reports to the leader one at a time, in order,
    /// retrying until each is recorded or moot.
    fn reporter(
        &self,
    ) -> (
        mpsc::UnboundedSender<GroupCommand>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, mut rx) = mpsc::unbounded_channel::<GroupCommand>();
        let cluster = self.cluster.clone();
        let pause = self.cfg.lease / 4;
        let task = tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                // Never given up: a lost release would leave the group
                // waiting on this node (the leader revokes an overdue
                // handover in the end, but that takes far longer).
                let mut wait = pause;
                loop {
                    let req = GroupRequest::Record(cmd.clone());
                    match cluster.to_leader(req, pause * 4).await {
                        Ok(GroupReply::Recorded) => break,
                        // Another epoch by now: the report is moot.
                        Ok(GroupReply::Refused(Refusal::NotApplied(_))) => break,
                        other => tracing::debug!(answer = ?other, "report not recorded yet"),
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(REPORT_PAUSE_MAX);
                }
            }
        });
        (tx, task)
    }
}

/// Tell the cluster how this node's configuration defines the group, once
/// per start (retried until recorded, or already so): a leader that does
/// not define the group itself — a witness — then still places it.
async fn declare(cluster: ClusterHandle, cfg: GroupConfig) {
    let cmd = GroupCommand::Declare {
        group: cfg.name.clone(),
        preferred: cfg.preferred_nodes.clone(),
        failback: cfg.failback,
        lease_ms: cfg.lease.as_millis() as u64,
        handover_ms: (cfg.drain_timeout + cfg.stop_timeout).as_millis() as u64,
    };
    let mut pause = cfg.lease / 4;
    loop {
        let done = cluster
            .view
            .borrow()
            .state
            .groups
            .get(&cfg.name)
            .is_some_and(|g| {
                let mut declared = g.clone();
                // Stale if nothing would change.
                cmd.apply(&mut declared) == crate::cluster::state::Response::Stale
            });
        if done {
            return;
        }
        let req = GroupRequest::Record(cmd.clone());
        match cluster.to_leader(req, Duration::from_secs(2)).await {
            Ok(GroupReply::Recorded) => return,
            other => tracing::debug!(group = %cfg.name, answer = ?other, "group not declared yet"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
