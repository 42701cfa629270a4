//! Forwarding a primary's progress to one holder: recipients done and
//! messages removed pile up for a moment (or until enough are waiting)
//! and go in one call. A batch that fails is retried, with what came
//! meanwhile, as long as the holder is a member; for a node that no
//! longer is, it is dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::{Replicas, Settings};
use crate::backoff::Backoff;
use crate::cluster::rpc::shadow::{ShadowReply, ShadowRequest};
use crate::cluster::NodeId;
use crate::spool::QueueId;

/// One piece of progress for a holder.
#[derive(Debug)]
pub(super) enum Item {
    /// These recipients of the message are done.
    Done(QueueId, Vec<u32>),
    /// The message is finished (or was never acknowledged).
    Removed(QueueId),
    /// Send what is waiting now (one attempt), then answer: the node is
    /// stopping.
    Flush(oneshot::Sender<()>),
}

/// Progress not yet sent, merged per message.
#[derive(Default)]
struct Batch {
    done: BTreeMap<u64, Vec<u32>>,
    removed: Vec<u64>,
    items: usize,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Batch {
    fn add(&mut self, item: Item) {
        if let Item::Flush(answer) = item {
            self.flushes.push(answer);
            return;
        }
        self.items += 1;
        match item {
            Item::Done(id, mut idx) => {
                let e = self.done.entry(id.0).or_default();
                e.append(&mut idx);
                e.sort_unstable();
                e.dedup();
            }
            Item::Removed(id) => {
                // A removed message's recipients need not be sent.
                self.done.remove(&id.0);
                self.removed.push(id.0);
            }
            Item::Flush(_) => {}
        }
    }

    fn idle(&self) -> bool {
        self.items == 0 && self.flushes.is_empty()
    }

    /// Answer the flushes waiting: what was there has had its attempt.
    fn flushed(&mut self) {
        for f in self.flushes.drain(..) {
            let _ = f.send(());
        }
    }

    fn request(&self) -> ShadowRequest {
        ShadowRequest::Progress {
            done: self.done.iter().map(|(k, v)| (*k, v.clone())).collect(),
            removed: self.removed.clone(),
        }
    }
}

/// Start the forwarder for holder `to`; progress goes in through the
/// sender, and the task ends when it is dropped or `cancel` fires.
pub(super) fn spawn(
    to: NodeId,
    replicas: Arc<dyn Replicas>,
    settings: Settings,
    cancel: CancellationToken,
) -> mpsc::UnboundedSender<Item> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(to, replicas, settings, rx, cancel));
    tx
}

async fn run(
    to: NodeId,
    replicas: Arc<dyn Replicas>,
    settings: Settings,
    mut rx: mpsc::UnboundedReceiver<Item>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(settings.batch_delay, settings.batch_delay * 25);
    let mut batch = Batch::default();
    let mut open = true;
    loop {
        if batch.idle() {
            if !open {
                return;
            }
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                item = rx.recv() => item,
            };
            match first {
                Some(item) => batch.add(item),
                None => return,
            }
        }
        // Gather what comes within the delay, up to the batch size; a
        // flush sends at once.
        let until = Instant::now() + settings.batch_delay;
        while open && batch.items < settings.batch_max && batch.flushes.is_empty() {
            match timeout_at(until, rx.recv()).await {
                Ok(Some(item)) => batch.add(item),
                Ok(None) => open = false,
                Err(_) => break,
            }
        }
        while batch.items < settings.batch_max {
            match rx.try_recv() {
                Ok(item) => batch.add(item),
                Err(_) => break,
            }
        }
        if batch.items == 0 {
            batch.flushed();
            continue;
        }
        if !replicas.is_member(to) {
            // Gone from the cluster: nobody will ever need it there.
            let flushes = std::mem::take(&mut batch.flushes);
            batch = Batch::default();
            batch.flushes = flushes;
            batch.flushed();
            continue;
        }
        let reply = tokio::select! {
            _ = cancel.cancelled() => return,
            r = replicas.call(to, batch.request(), settings.store_timeout) => r,
        };
        match reply {
            Ok(ShadowReply::Applied) => {
                let flushes = std::mem::take(&mut batch.flushes);
                batch = Batch::default();
                batch.flushes = flushes;
                batch.flushed();
                backoff.reset();
            }
            other => {
                tracing::debug!(holder = %format_args!("{to:016x}"), answer = ?other, "shadow progress not taken; retrying");
                // A stopping node does not wait for a holder that fails.
                batch.flushed();
                let pause = backoff.next(crate::backoff::jitter());
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}
