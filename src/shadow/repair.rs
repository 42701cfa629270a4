//! Keeping copies whole after "250": messages with fewer copies than
//! wanted, or with a holder that is down or gone, are copied to other
//! members ([`ReplicatedSpool::repair`]); and each holder is told now
//! and then which of this node's shadows it should still keep
//! ([`ReplicatedSpool::reconcile`]), so that shadows whose progress got
//! lost do not pile up.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{choose, shadow_of, Item, ReplicatedSpool};
use crate::cluster::rpc::shadow::{ShadowReply, ShadowRequest};
use crate::cluster::NodeId;
use crate::spool::{QueueId, RcptState, Spool};

/// Most messages one repair round copies, so a round stays short and
/// the writes it adds to each holder stay modest.
const REPAIR_BATCH: usize = 256;

impl ReplicatedSpool {
    /// Copy messages that lack copies to members that can take them.
    /// Returns how many got all the copies they were missing.
    pub async fn repair(&self) -> usize {
        let wanted = usize::from(self.settings.replicas) - 1;
        if wanted == 0 {
            return 0;
        }
        let candidates = self.replicas.candidates();
        // (id, live holders) of the messages short of copies, which are
        // counted as under-replicated from now on (a holder that went
        // down or left takes its copies with it).
        let short: Vec<(QueueId, Vec<NodeId>)> = {
            let mut book = self.book();
            let book = &mut *book;
            let mut short = Vec::new();
            let mut under = std::collections::BTreeSet::new();
            for (id, e) in &book.messages {
                let live: Vec<NodeId> = e
                    .holders
                    .iter()
                    .copied()
                    .filter(|h| candidates.contains(h))
                    .collect();
                if live.len() >= wanted {
                    continue;
                }
                under.insert(*id);
                if short.len() < REPAIR_BATCH && !book.in_flight.contains(id) {
                    short.push((*id, live));
                }
            }
            for id in under.difference(&book.under) {
                let copies = book.messages.get(id).map_or(0, |e| {
                    e.holders.iter().filter(|h| candidates.contains(h)).count()
                });
                let kind = crate::events::CopiesEvent::Underreplicated;
                crate::events::copies(kind, *id, copies + 1, wanted + 1);
            }
            book.under = under;
            crate::metrics::underreplicated(book.under.len());
            for (id, _) in &short {
                book.in_flight.insert(*id);
            }
            short
        };
        let mut whole = 0;
        for (id, live) in short {
            if self.repair_one(id, live, &candidates, wanted).await {
                whole += 1;
            }
            self.book().in_flight.remove(&id);
        }
        whole
    }

    async fn repair_one(
        &self,
        id: QueueId,
        live: Vec<NodeId>,
        candidates: &[NodeId],
        wanted: usize,
    ) -> bool {
        let others: Vec<NodeId> = candidates
            .iter()
            .copied()
            .filter(|c| !live.contains(c))
            .collect();
        let new = choose(id, &others, wanted - live.len());
        if new.is_empty() {
            return false;
        }
        let Ok(body) = self.local.body(id).await else {
            return false;
        };
        let Some(envelope) = self.book().messages.get(&id).cloned() else {
            return false;
        };
        let acked = self.copy_to(&new, shadow_of(&envelope, &body)).await;
        let mut holders = live;
        holders.extend(&acked);
        if holders == envelope.holders {
            return false;
        }
        let recorded = self.set_holders(id, holders.clone()).await.is_ok();
        // Finished while the copy travelled (its removal went to the old
        // holders only), or the holders not recorded: the new copies
        // belong to no message.
        if !recorded || !self.book().messages.contains_key(&id) {
            for h in acked {
                self.forward(h, Item::Removed(id));
            }
            return false;
        }
        // Progress made while the copy travelled went to the old holders
        // only: tell the new ones what is done by now (idempotent).
        let done: Vec<u32> = match self.book().messages.get(&id) {
            Some(e) => e
                .recipients
                .iter()
                .enumerate()
                .filter(|(_, r)| r.state == RcptState::Done)
                .map(|(i, _)| i as u32)
                .collect(),
            None => Vec::new(),
        };
        if !done.is_empty() {
            for h in &acked {
                self.forward(*h, Item::Done(id, done.clone()));
            }
        }
        // A holder struck off as down keeps its copy until it is back and
        // a reconcile tells it to forget it.
        let restored = holders.len() >= wanted;
        if restored {
            let kind = crate::events::CopiesEvent::Replicated;
            crate::events::copies(kind, id, holders.len() + 1, wanted + 1);
        }
        restored
    }

    /// Tell every member that may hold copies which of this node's
    /// messages it keeps; it forgets the others below the mark. Returns
    /// how many shadows the holders forgot.
    pub async fn reconcile(&self) -> u64 {
        let mut discarded = 0;
        for h in self.replicas.candidates() {
            discarded += self.reconcile_with(h).await;
        }
        discarded
    }

    /// Tell holder `h` which of this node's shadows it should keep;
    /// returns how many it forgot.
    pub async fn reconcile_with(&self, h: NodeId) -> u64 {
        let (keep, below) = {
            let book = self.book();
            let mut keep: Vec<u64> = book
                .messages
                .values()
                .filter(|e| e.holders.contains(&h))
                .map(|e| e.id.0)
                .collect();
            keep.sort_unstable();
            // Copies under way may reach the holder before the book
            // knows them: nothing from the oldest of them on is touched
            // (nor anything newer than every message known).
            let newest = book.messages.keys().map(|id| id.0 + 1).max().unwrap_or(0);
            let below = book.in_flight.first().map_or(newest, |id| id.0.min(newest));
            (keep, below)
        };
        let req = ShadowRequest::Reconcile { keep, below };
        match self.call(h, req).await {
            Ok(ShadowReply::Reconciled { discarded }) => discarded,
            other => {
                tracing::debug!(holder = %format_args!("{h:016x}"), answer = ?other, "reconcile not taken");
                0
            }
        }
    }
}

/// Repair every `every` and reconcile every `reconcile_every` until
/// `cancel` fires.
pub async fn run(
    spool: Arc<ReplicatedSpool>,
    every: Duration,
    reconcile_every: Duration,
    cancel: CancellationToken,
) {
    let mut repair = tokio::time::interval(every);
    repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Every member up at the start is reconciled with by the first
    // repair tick.
    let first = tokio::time::Instant::now() + reconcile_every;
    let mut reconcile = tokio::time::interval_at(first, reconcile_every);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A member that comes (back) up is reconciled with at once — at the
    // start, every one: it may keep shadows whose progress it missed
    // while it or this node was away.
    let mut up: Vec<NodeId> = Vec::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = repair.tick() => {
                let now = spool.replicas.candidates();
                for h in now.iter().filter(|h| !up.contains(h)) {
                    spool.reconcile_with(*h).await;
                }
                up = now;
                spool.repair().await;
            }
            _ = reconcile.tick() => {
                let n = spool.reconcile().await;
                if n > 0 {
                    tracing::info!(discarded = n, "holders forgot shadows this node no longer has");
                }
            }
        }
    }
}
