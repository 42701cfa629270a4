//! Promotion: what becomes of shadow copies when the cluster fences their
//! primary.
//!
//! The cluster takes a failed member's delivery epoch back, waits until
//! its lease has certainly run out — it delivers nothing from then on —
//! and ends the epoch naming the members up at that moment as *takers*
//! (see `cluster::state::groups::Promotion`). Then:
//!
//! - each taker detaches the copies it holds of that primary, stores each
//!   in its own spool under a new queue id (copied on from there like any
//!   message it accepts) with the recipients the primary had reported
//!   done left out, and delivers it;
//! - a holder that is not a taker (it was down) keeps its copies: the
//!   primary still has those messages and delivers them itself;
//! - the primary, if it comes back with its disk, first drops each of its
//!   messages that a taker holds a copy of, and makes no copy and
//!   delivers nothing until it has (its delivery gate waits for it).
//!
//! A holder keeps a copy only from a primary that holds a live delivery
//! epoch in its view, under that very epoch, and never while a takeover
//! of that primary is still to be detached: so a copy either reaches the
//! taker with the others, or is refused and stays with its primary alone.
//!
//! The one duplicate left: a recipient the primary delivered in its last
//! moments whose progress had not yet reached the taker (progress goes out
//! in batches within 25 ms; a primary cut off from the holders delivers
//! until its lease ends) is delivered again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::holder::{Admit, Detached, Holder};
use super::ReplicatedSpool;
use crate::cluster::raft::store::ClusterView;
use crate::cluster::state::groups::{delivery_group, delivery_node, Promotion};
use crate::cluster::state::ClusterState;
use crate::cluster::NodeId;
use crate::events;
use crate::queue::ops::{Op, Selector};
use crate::queue::QueueHandle;
use crate::spool::{Envelope, IdGen, Spool, SpoolError};

/// How often a takeover that failed (a full disk, too few members for
/// `min_replicas`) is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Where taken-over messages go: this node's own spool and queue.
pub struct Mailroom {
    /// The spool (replicated: taken-over mail is copied on).
    pub spool: Arc<dyn Spool>,
    /// The queue.
    pub queue: QueueHandle,
    /// Queue ids.
    pub ids: Arc<IdGen>,
}

/// Takes fenced primaries' copies over, and settles takeovers of this
/// node's own.
pub struct Promoter {
    me: NodeId,
    view: watch::Receiver<ClusterView>,
    holder: Holder,
    mail: Mailroom,
    replicated: Option<Arc<ReplicatedSpool>>,
    /// The last takeover of this node's copies settled (shared with the
    /// replicas, which make no copy until it is current).
    settled: Arc<AtomicU64>,
    /// Where `settled` is kept across restarts.
    settled_file: PathBuf,
    /// Wakes the delivery gate's start when `settled` moves.
    settled_tx: watch::Sender<u64>,
    /// Detached shelves still to take over.
    pending: Mutex<Vec<Detached>>,
}

/// The last takeover of this node's own copies it settled, as recorded in
/// `file` (0: none).
pub fn load_settled(file: &std::path::Path) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// The takeover of `node`'s copies in `state`, if any.
fn promotion(state: &ClusterState, node: NodeId) -> Option<Promotion> {
    let m = state.members.get(&node)?;
    let g = state.groups.get(&delivery_group(&m.member.name))?;
    g.promoted.get(&node).cloned()
}

/// The holder's rule for a primary's copy sent under `epoch`: stored only
/// while the primary holds that live delivery epoch here, and no takeover
/// of it waits to be detached.
pub fn admit(view: watch::Receiver<ClusterView>, holder: Holder) -> Admit {
    Arc::new(move |primary, epoch| {
        let v = view.borrow();
        let m = v
            .state
            .members
            .get(&primary)
            .ok_or("the sender is not a member")?;
        let name = &m.member.name;
        let g = v.state.groups.get(&delivery_group(name));
        let live = g.is_some_and(|g| {
            g.owner == Some(primary) && !g.revoked && !g.released && g.epoch == epoch
        });
        if !live {
            return Err(format!(
                "{name} does not hold delivery epoch {epoch} as this node sees it"
            ));
        }
        let taken = g
            .and_then(|g| g.promoted.get(&primary))
            .map_or(0, |p| p.epoch);
        if taken > holder.done(primary) {
            return Err(format!("{name}'s earlier copies are being taken over"));
        }
        Ok(())
    })
}

impl Promoter {
    /// For node `me`: takes over into `mail` what `holder` holds, and
    /// settles its own takeovers against `replicated`; `settled` is what
    /// `settled_file` recorded at start.
    pub fn new(
        me: NodeId,
        view: watch::Receiver<ClusterView>,
        holder: Holder,
        mail: Mailroom,
        replicated: Option<Arc<ReplicatedSpool>>,
        (settled, settled_file): (Arc<AtomicU64>, PathBuf),
    ) -> Promoter {
        let pending = Mutex::new(holder.resume());
        let (settled_tx, _) = watch::channel(settled.load(Ordering::SeqCst));
        Promoter {
            me,
            view,
            holder,
            mail,
            replicated,
            settled,
            settled_file,
            settled_tx,
            pending,
        }
    }

    /// Until `cancel`: act on every takeover the cluster state records.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut view = self.view.clone();
        let mut retry = tokio::time::interval(RETRY);
        loop {
            self.step().await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = view.changed() => if changed.is_err() { return },
                _ = retry.tick() => {}
            }
        }
    }

    /// Whether this node may deliver as far as takeovers go: waits until
    /// it has settled the last takeover of its own copies.
    pub fn ready(self: &Arc<Self>) -> BoxFuture<'static, Result<(), String>> {
        let this = self.clone();
        Box::pin(async move {
            let mut settled = this.settled_tx.subscribe();
            loop {
                let want = promotion(&this.view.borrow().state, this.me).map_or(0, |p| p.epoch);
                if *settled.borrow_and_update() >= want {
                    return Ok(());
                }
                if settled.changed().await.is_err() {
                    return Err("stopping".into());
                }
            }
        })
    }

    async fn step(&self) {
        let promotions: Vec<(NodeId, Promotion)> = {
            let v = self.view.borrow();
            let groups = v.state.groups.iter();
            groups
                .filter(|(name, _)| delivery_node(name).is_some())
                .flat_map(|(_, g)| g.promoted.clone())
                .collect()
        };
        for (primary, p) in promotions {
            if primary == self.me {
                self.settle(&p).await;
                continue;
            }
            if p.epoch <= self.holder.done(primary) {
                continue;
            }
            let take = p.takers.contains(&self.me);
            match self.holder.detach(primary, p.epoch, take).await {
                Ok(Some(d)) => self.lock_pending().push(d),
                Ok(None) => {}
                Err(e) => tracing::error!(
                    primary = %format_args!("{primary:016x}"), error = %e,
                    "cannot detach a fenced node's shadow copies; trying again"
                ),
            }
        }
        let pending = std::mem::take(&mut *self.lock_pending());
        for d in pending {
            if let Err((d, e)) = self.take_over(d).await {
                tracing::error!(
                    primary = %format_args!("{:016x}", d.primary), error = %e,
                    "taking over a fenced node's shadow copies stopped; trying again"
                );
                self.lock_pending().push(d);
            }
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Vec<Detached>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Store each copy in `d` as this node's own, then delete `d`.
    async fn take_over(&self, d: Detached) -> Result<(), (Detached, SpoolError)> {
        let shadows = d.envelopes();
        let primary = d.primary;
        tracing::info!(
            primary = %format_args!("{primary:016x}"), messages = shadows.len(),
            "taking over a fenced node's shadow copies"
        );
        for e in shadows {
            if let Err(err) = self.take_one(&d, &e).await {
                return Err((d, err));
            }
        }
        d.finish()
            .map_err(|e| {
                // Everything was taken; only the empty shelf is left behind.
                tracing::warn!(error = %e, "cannot delete a taken-over shelf");
            })
            .ok();
        Ok(())
    }

    async fn take_one(&self, d: &Detached, e: &Envelope) -> Result<(), SpoolError> {
        if !e.is_finished() {
            let body = d.body(e.id).await?;
            let ours = Envelope {
                id: self.mail.ids.next(),
                holders: Vec::new(),
                ..e.clone()
            };
            self.mail.spool.store(ours.clone(), body).await?;
            events::taken_over(ours.id, d.primary, e.id, &e.sender, e.recipients.len());
            self.mail.queue.admit(ours);
        }
        d.discard(e.id).await
    }

    /// Drop this node's messages that takers of `p` hold copies of (they
    /// deliver them now), once per takeover.
    async fn settle(&self, p: &Promotion) {
        if p.epoch <= self.settled.load(Ordering::SeqCst) {
            return;
        }
        let gone = match &self.replicated {
            Some(r) => r.held_by_any(&p.takers),
            None => Vec::new(),
        };
        tracing::warn!(
            epoch = p.epoch, messages = gone.len(),
            "this node was fenced and its shadow copies taken over: dropping what the takers deliver"
        );
        for (id, taker) in gone {
            let sel = Selector {
                ids: vec![id.to_string()],
                ..Selector::default()
            };
            // Gone already (delivered before the fence) is fine too.
            if let Some(Ok(_)) = self.mail.queue.act(Op::Delete, sel).await {
                events::given_up(id, taker);
            }
        }
        let written = std::fs::write(&self.settled_file, p.epoch.to_string())
            .and_then(|()| std::fs::File::open(&self.settled_file)?.sync_all());
        if let Err(e) = written {
            // Unrecorded, a restart would settle it again — and drop the
            // copies made after it: no copies, no delivery until it is.
            tracing::error!(error = %e, "cannot record the settled takeover; trying again");
            return;
        }
        self.settled.store(p.epoch, Ordering::SeqCst);
        self.settled_tx.send_replace(p.epoch);
    }
}

#[cfg(test)]
#[path = "promote_tests.rs"]
mod tests;
