//! The primary side: a [`Spool`] around this node's own that makes each
//! new message durable on `replicas − 1` other members as well, all
//! writes at once, before `store` returns — and so before "250".
//!
//! Holders are chosen by rendezvous hashing on (queue id, node id), so
//! copies spread over the members and the choice moves little when one
//! comes or goes. The holders are written into the message's own spool
//! record; one whose copy fails is struck off durably before "250", so
//! the record names exactly the members that hold a copy. With fewer
//! copies than `replicas` the message is *under-replicated* (counted,
//! logged, repaired later); with fewer than `min_replicas` the store
//! fails and nothing is acknowledged.
//!
//! Recipients done and messages removed are forwarded to the holders
//! afterwards, batched ([`super::replicate::forward`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{join_all, BoxFuture};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::rpc::shadow::{
    ShadowMessage, ShadowRecipient, ShadowReply, ShadowRequest, MAX_SHADOW_PART,
};
use crate::cluster::NodeId;
use crate::events::{self, CopiesEvent};
use crate::spool::{Envelope, QueueId, RcptState, Recovered, Spool, SpoolError, SpoolFuture};

#[path = "forward.rs"]
mod forward;
#[path = "repair.rs"]
pub mod repair;

use forward::Item;

/// What the replicated spool needs of the cluster.
pub trait Replicas: Send + Sync + 'static {
    /// This node's id.
    fn me(&self) -> NodeId;
    /// The members that may hold copies now: up, not witnesses, not this
    /// node.
    fn candidates(&self) -> Vec<NodeId>;
    /// Whether `node` is still a member of the cluster (in any state):
    /// progress for a node that is not is dropped.
    fn is_member(&self, node: NodeId) -> bool;
    /// One shadow call on member `to`, bounded by `timeout`.
    fn call(
        &self,
        to: NodeId,
        req: ShadowRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<ShadowReply, String>>;
}

/// How many copies, and how long to wait for them.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Copies wanted, this node's included (`[spool] replicas`).
    pub replicas: u8,
    /// Copies required before "250" (`[spool] min_replicas`).
    pub min_replicas: u8,
    /// Longest wait for a holder's copy: a stuck holder must not hang a
    /// client.
    pub store_timeout: Duration,
    /// Progress waits this long for more to send with it. What was
    /// delivered within it before the node died is delivered again by
    /// the takers: short, while still batching under load.
    pub batch_delay: Duration,
    /// Progress is sent at once when this much piled up.
    pub batch_max: usize,
}

impl Settings {
    /// `replicas` and `min_replicas` with the usual timings.
    pub fn new(replicas: u8, min_replicas: u8) -> Settings {
        Settings {
            replicas: replicas.max(1),
            min_replicas: min_replicas.clamp(1, replicas.max(1)),
            store_timeout: Duration::from_secs(2),
            batch_delay: Duration::from_millis(25),
            batch_max: 256,
        }
    }
}

/// What the primary knows of its messages' copies.
#[derive(Default)]
struct Book {
    /// Every live message: its envelope as it now stands, holders included.
    messages: HashMap<QueueId, Envelope>,
    /// Those with fewer copies than wanted.
    under: BTreeSet<QueueId>,
    /// Messages whose copies are being made (stores, repairs): a
    /// reconcile must not discard them.
    in_flight: BTreeSet<QueueId>,
}

/// A [`Spool`] that copies each message to other members before it is
/// acknowledged, and keeps the copies' holders up to date.
pub struct ReplicatedSpool {
    local: Arc<dyn Spool>,
    replicas: Arc<dyn Replicas>,
    settings: Settings,
    book: Mutex<Book>,
    forwarders: Mutex<HashMap<NodeId, mpsc::UnboundedSender<Item>>>,
    cancel: CancellationToken,
}

/// The `n` holders for message `id` among `candidates`: the highest
/// rendezvous scores, so each message spreads differently.
pub fn choose(id: QueueId, candidates: &[NodeId], n: usize) -> Vec<NodeId> {
    let mut scored: Vec<(u64, NodeId)> = candidates
        .iter()
        .map(|&node| (score(id.0, node), node))
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().take(n).map(|(_, node)| node).collect()
}

/// A well-mixed hash of the pair (splitmix64's finaliser).
fn score(id: u64, node: u64) -> u64 {
    let mut z = id ^ node.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The message as a holder keeps it.
pub fn shadow_of(envelope: &Envelope, body: &Bytes) -> ShadowMessage {
    ShadowMessage {
        id: envelope.id.0,
        sender: envelope.sender.clone(),
        recipients: envelope
            .recipients
            .iter()
            .map(|r| ShadowRecipient {
                address: r.address.clone(),
                done: r.state == RcptState::Done,
            })
            .collect(),
        arrived_ms: envelope.arrived_ms,
        staged: 0,
        epoch: 0,
        body: body.clone(),
    }
}

impl ReplicatedSpool {
    /// Copies of what `local` stores go to members `replicas` gives, as
    /// `settings` say; what `local` recovered is taken into account
    /// (its holders, and which messages are under-replicated). Spawns
    /// no task until progress is forwarded; `cancel` ends them.
    pub fn new(
        local: Arc<dyn Spool>,
        replicas: Arc<dyn Replicas>,
        settings: Settings,
        cancel: CancellationToken,
    ) -> ReplicatedSpool {
        let mut book = Book::default();
        for r in local.recovered() {
            let e = r.envelope;
            if e.holders.len() + 1 < usize::from(settings.replicas) {
                book.under.insert(e.id);
            }
            book.messages.insert(e.id, e);
        }
        crate::metrics::underreplicated(book.under.len());
        ReplicatedSpool {
            local,
            replicas,
            settings,
            book: Mutex::new(book),
            forwarders: Mutex::default(),
            cancel,
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Messages with fewer copies than wanted, in id order.
    pub fn underreplicated(&self) -> Vec<QueueId> {
        self.book().under.iter().copied().collect()
    }

    /// The members holding copies of message `id` (for `ctl queue show`).
    pub fn holders(&self, id: QueueId) -> Option<Vec<NodeId>> {
        self.book().messages.get(&id).map(|e| e.holders.clone())
    }

    /// This node's messages that one of `nodes` holds a copy of, each
    /// with the first such holder.
    pub fn held_by_any(&self, nodes: &BTreeSet<NodeId>) -> Vec<(QueueId, NodeId)> {
        let book = self.book();
        book.messages
            .values()
            .filter_map(|e| {
                let h = e.holders.iter().find(|h| nodes.contains(h))?;
                Some((e.id, *h))
            })
            .collect()
    }

    /// How many of this node's messages each member holds copies of.
    pub fn shadows_per_holder(&self) -> BTreeMap<NodeId, usize> {
        let mut counts = BTreeMap::new();
        for e in self.book().messages.values() {
            for h in &e.holders {
                *counts.entry(*h).or_default() += 1;
            }
        }
        counts
    }

    /// Ask each holder for a copy; the holders that made it durable.
    async fn copy_to(&self, holders: &[NodeId], message: ShadowMessage) -> Vec<NodeId> {
        let calls = holders.iter().map(|&h| {
            let copy = self.copy_one(h, message.clone());
            async move {
                match copy.await {
                    Ok(()) => {
                        crate::metrics::shadow_sent("stored");
                        Some(h)
                    }
                    Err(why) => {
                        crate::metrics::shadow_sent("failed");
                        tracing::warn!(holder = %format_args!("{h:016x}"), queue_id = %QueueId(message.id), error = %why, "shadow copy failed");
                        None
                    }
                }
            }
        });
        join_all(calls).await.into_iter().flatten().collect()
    }

    /// One copy on holder `h`: a large message's content in parts first,
    /// then the message with the rest.
    async fn copy_one(&self, h: NodeId, mut message: ShadowMessage) -> Result<(), String> {
        let body = std::mem::take(&mut message.body);
        let mut offset = 0;
        while body.len() - offset > MAX_SHADOW_PART {
            let part = ShadowRequest::Part {
                id: message.id,
                offset: offset as u64,
                bytes: body.slice(offset..offset + MAX_SHADOW_PART),
            };
            match self.call(h, part).await? {
                ShadowReply::Staged => offset += MAX_SHADOW_PART,
                other => return Err(format!("part refused: {other:?}")),
            }
        }
        message.staged = offset as u64;
        message.body = body.slice(offset..);
        match self.call(h, ShadowRequest::Store { message }).await? {
            ShadowReply::Stored => Ok(()),
            other => Err(format!("copy refused: {other:?}")),
        }
    }

    /// One call on holder `h` within the store timeout: bounded here too,
    /// so a stuck holder cannot hang the client whatever the transport
    /// does with the deadline.
    async fn call(&self, h: NodeId, req: ShadowRequest) -> Result<ShadowReply, String> {
        let timeout = self.settings.store_timeout;
        let call = self.replicas.call(h, req, timeout);
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| Err("no answer in time".into()))
    }

    /// Store locally and on the chosen holders at once; see the module.
    async fn store_replicated(
        &self,
        mut envelope: Envelope,
        body: Bytes,
    ) -> Result<(), SpoolError> {
        let id = envelope.id;
        let wanted = usize::from(self.settings.replicas) - 1;
        let chosen = choose(id, &self.replicas.candidates(), wanted);
        let possible = chosen.len() + 1;
        if possible < usize::from(self.settings.min_replicas) {
            // Too few members up to make enough copies: refused before
            // anything is written.
            let needed = usize::from(self.settings.min_replicas);
            events::copies(CopiesEvent::NotEnoughCopies, id, possible, needed);
            return Err(SpoolError::Replicas {
                made: 0,
                needed: self.settings.min_replicas,
            });
        }
        envelope.holders = chosen.clone();
        self.book().in_flight.insert(id);
        let shadow = (!chosen.is_empty()).then(|| shadow_of(&envelope, &body));
        let copies = async {
            match shadow {
                Some(m) => self.copy_to(&chosen, m).await,
                None => Vec::new(),
            }
        };
        let (local, acked) = tokio::join!(self.local.store(envelope.clone(), body), copies);
        let result = self.settle(&mut envelope, local, &acked).await;
        let mut book = self.book();
        book.in_flight.remove(&id);
        match result {
            Ok(()) => {
                if acked.len() < wanted {
                    book.under.insert(id);
                    crate::metrics::underreplicated(book.under.len());
                    let kind = CopiesEvent::Underreplicated;
                    events::copies(kind, id, acked.len() + 1, wanted + 1);
                }
                book.messages.insert(id, envelope);
                Ok(())
            }
            Err(e) => {
                drop(book);
                // Not acknowledged: copies made anyway are forgotten.
                for h in acked {
                    self.forward(h, Item::Removed(id));
                }
                Err(e)
            }
        }
    }

    /// After the writes: enough copies? If a holder failed, strike it off
    /// the local record before "250".
    async fn settle(
        &self,
        envelope: &mut Envelope,
        local: Result<(), SpoolError>,
        acked: &[NodeId],
    ) -> Result<(), SpoolError> {
        local?;
        let id = envelope.id;
        let made = (acked.len() + 1) as u8;
        if made < self.settings.min_replicas {
            let needed = usize::from(self.settings.min_replicas);
            events::copies(CopiesEvent::NotEnoughCopies, id, made.into(), needed);
            let _ = self.local.remove(id).await;
            return Err(SpoolError::Replicas {
                made,
                needed: self.settings.min_replicas,
            });
        }
        if acked.len() < envelope.holders.len() {
            envelope.holders.retain(|h| acked.contains(h));
            if let Err(e) = self.local.set_holders(id, envelope.holders.clone()).await {
                let _ = self.local.remove(id).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Send the progress waiting for every holder now, one attempt each,
    /// and return once all were made or `within` is over: a node that
    /// stops on purpose leaves its holders nothing to deliver again.
    pub async fn flush(&self, within: Duration) {
        let waits: Vec<_> = {
            let forwarders = self.forwarders.lock().unwrap_or_else(|e| e.into_inner());
            forwarders
                .values()
                .filter_map(|tx| {
                    let (answer, wait) = tokio::sync::oneshot::channel();
                    tx.send(Item::Flush(answer)).ok().map(|()| wait)
                })
                .collect()
        };
        if tokio::time::timeout(within, join_all(waits)).await.is_err() {
            tracing::warn!("shadow progress not all sent before stopping");
        }
    }

    /// Queue `item` for holder `h`'s forwarder, starting it if need be.
    fn forward(&self, h: NodeId, item: Item) {
        let mut forwarders = self.forwarders.lock().unwrap_or_else(|e| e.into_inner());
        let tx = forwarders.entry(h).or_insert_with(|| {
            forward::spawn(
                h,
                self.replicas.clone(),
                self.settings,
                self.cancel.child_token(),
            )
        });
        if let Err(mpsc::error::SendError(item)) = tx.send(item) {
            // Its task ended (cancelled): a fresh one, unless stopping.
            if !self.cancel.is_cancelled() {
                let fresh = forward::spawn(
                    h,
                    self.replicas.clone(),
                    self.settings,
                    self.cancel.child_token(),
                );
                let _ = fresh.send(item);
                *tx = fresh;
            }
        }
    }

    async fn update_replicated(
        &self,
        id: QueueId,
        changes: Vec<(usize, RcptState)>,
    ) -> Result<(), SpoolError> {
        self.local.update(id, changes.clone()).await?;
        let done: Vec<u32> = changes
            .iter()
            .filter(|(_, s)| *s == RcptState::Done)
            .map(|(i, _)| *i as u32)
            .collect();
        let holders = {
            let mut book = self.book();
            let Some(e) = book.messages.get_mut(&id) else {
                return Ok(());
            };
            for (i, state) in changes {
                if let Some(r) = e.recipients.get_mut(i) {
                    r.state = state;
                }
            }
            e.holders.clone()
        };
        // Attempt counts stay here: only what a holder must not deliver
        // again matters to it.
        if !done.is_empty() {
            for h in holders {
                self.forward(h, Item::Done(id, done.clone()));
            }
        }
        Ok(())
    }

    async fn remove_replicated(&self, id: QueueId) -> Result<(), SpoolError> {
        self.local.remove(id).await?;
        let holders = {
            let mut book = self.book();
            let gone = book.messages.remove(&id);
            if book.under.remove(&id) {
                crate::metrics::underreplicated(book.under.len());
            }
            gone.map(|e| e.holders).unwrap_or_default()
        };
        for h in holders {
            self.forward(h, Item::Removed(id));
        }
        Ok(())
    }

    async fn set_holders_replicated(
        &self,
        id: QueueId,
        holders: Vec<NodeId>,
    ) -> Result<(), SpoolError> {
        self.local.set_holders(id, holders.clone()).await?;
        let mut book = self.book();
        let wanted = usize::from(self.settings.replicas) - 1;
        if let Some(e) = book.messages.get_mut(&id) {
            e.holders = holders;
            let short = e.holders.len() < wanted;
            let changed = match short {
                true => book.under.insert(id),
                false => book.under.remove(&id),
            };
            if changed {
                crate::metrics::underreplicated(book.under.len());
            }
        }
        Ok(())
    }
}

impl Spool for ReplicatedSpool {
    fn store(&self, envelope: Envelope, body: Bytes) -> SpoolFuture<'_, ()> {
        Box::pin(self.store_replicated(envelope, body))
    }

    fn update(&self, id: QueueId, changes: Vec<(usize, RcptState)>) -> SpoolFuture<'_, ()> {
        Box::pin(self.update_replicated(id, changes))
    }

    fn remove(&self, id: QueueId) -> SpoolFuture<'_, ()> {
        Box::pin(self.remove_replicated(id))
    }

    fn set_holders(&self, id: QueueId, holders: Vec<u64>) -> SpoolFuture<'_, ()> {
        Box::pin(self.set_holders_replicated(id, holders))
    }

    fn body(&self, id: QueueId) -> SpoolFuture<'_, Bytes> {
        self.local.body(id)
    }

    fn recovered(&self) -> Vec<Recovered> {
        self.local.recovered()
    }

    fn probe(&self) -> SpoolFuture<'_, ()> {
        self.local.probe()
    }
}

#[cfg(test)]
#[path = "replicate_tests.rs"]
mod tests;
