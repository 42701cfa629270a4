//! The holder side: shadow copies of other nodes' messages, one spool per
//! primary under `<data_dir>/shadows/<primary as 16 hex digits>/`.
//!
//! Each is an ordinary [`DiskSpool`], so a copy is group-committed with
//! concurrent copies and fsynced before the primary hears "stored", and
//! the shadows survive a restart of the holder. A primary's spool is
//! opened when its first copy arrives, or at start when its directory
//! exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::future::{join_all, BoxFuture};

use crate::cluster::rpc::shadow::{ShadowHandler, ShadowMessage, ShadowReply, ShadowRequest};
use crate::cluster::NodeId;
use crate::spool::disk::Limits;
use crate::spool::{DiskSpool, Envelope, QueueId, RcptState, Recipient, Spool, SpoolError};

/// The shadows one primary keeps here.
struct Shelf {
    spool: Arc<DiskSpool>,
    /// The shadows as they now stand (recipients done as last told).
    held: Mutex<BTreeMap<QueueId, Envelope>>,
}

impl Shelf {
    fn held(&self) -> MutexGuard<'_, BTreeMap<QueueId, Envelope>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Inner {
    dir: PathBuf,
    limits: Limits,
    shelves: Mutex<BTreeMap<NodeId, Arc<Shelf>>>,
    /// Primaries whose shadows were taken over: their copies and progress
    /// are refused from then on (the primary is fenced, or gone).
    taken: Mutex<std::collections::BTreeSet<NodeId>>,
    /// Parts of large messages received ahead of their `Store`.
    staging: Mutex<Staging>,
}

/// Most content held for messages whose parts are arriving: a bound on
/// what primaries can make a holder keep in memory.
const STAGING_LIMIT: usize = 256 << 20;
/// A message whose parts stopped coming this long ago is given up.
const STAGING_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Content received in parts, per (primary, queue id).
#[derive(Default)]
struct Staging {
    parts: std::collections::HashMap<(NodeId, u64), (bytes::BytesMut, tokio::time::Instant)>,
    bytes: usize,
}

impl Staging {
    /// Add a part; the primary starts over at offset 0.
    fn add(&mut self, key: (NodeId, u64), offset: u64, part: &[u8]) -> Result<(), String> {
        let now = tokio::time::Instant::now();
        let mut freed = 0;
        self.parts.retain(|k, (b, at)| {
            let keep = *k != key || offset != 0;
            let fresh = now.duration_since(*at) < STAGING_TTL;
            if !(keep && fresh) {
                freed += b.len();
            }
            keep && fresh
        });
        self.bytes -= freed;
        if self.bytes + part.len() > STAGING_LIMIT {
            return Err("too much content in parts held already".into());
        }
        let (buf, at) = self
            .parts
            .entry(key)
            .or_insert_with(|| (bytes::BytesMut::new(), now));
        if buf.len() as u64 != offset {
            return Err(format!("part at {offset}, {} bytes held", buf.len()));
        }
        buf.extend_from_slice(part);
        *at = now;
        self.bytes += part.len();
        Ok(())
    }

    /// The content held for `key`, if it is `len` bytes.
    fn take(&mut self, key: (NodeId, u64), len: u64) -> Option<bytes::BytesMut> {
        let (buf, _) = self.parts.remove(&key)?;
        self.bytes -= buf.len();
        (buf.len() as u64 == len).then_some(buf)
    }
}

/// Every primary's shadows on this node; cheap to clone.
#[derive(Clone)]
pub struct Holder {
    inner: Arc<Inner>,
}

fn primary_dir(dir: &Path, primary: NodeId) -> PathBuf {
    dir.join(format!("{primary:016x}"))
}

impl Holder {
    /// Open the shadows under `dir` (`<data_dir>/shadows`), recovering
    /// every primary's found there; each primary's spool within `limits`
    /// (a full disk refuses copies as it refuses mail).
    pub fn open(dir: &Path, limits: Limits) -> Result<Holder, SpoolError> {
        std::fs::create_dir_all(dir)?;
        let mut shelves = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(primary) = name
                .to_str()
                .filter(|n| n.len() == 16)
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            shelves.insert(primary, Arc::new(open_shelf(&entry.path(), limits)?));
        }
        Ok(Holder {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                limits,
                shelves: Mutex::new(shelves),
                taken: Mutex::default(),
                staging: Mutex::default(),
            }),
        })
    }

    fn shelves(&self) -> MutexGuard<'_, BTreeMap<NodeId, Arc<Shelf>>> {
        self.inner.shelves.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shelf(&self, primary: NodeId) -> Option<Arc<Shelf>> {
        self.shelves().get(&primary).cloned()
    }

    fn is_taken(&self, primary: NodeId) -> bool {
        let taken = self.inner.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.contains(&primary)
    }

    /// The primary's shelf, opened (and its directory made) if need be.
    fn shelf_or_open(&self, primary: NodeId) -> Result<Arc<Shelf>, SpoolError> {
        let mut shelves = self.shelves();
        if let Some(s) = shelves.get(&primary) {
            return Ok(s.clone());
        }
        let shelf = Arc::new(open_shelf(
            &primary_dir(&self.inner.dir, primary),
            self.inner.limits,
        )?);
        shelves.insert(primary, shelf.clone());
        Ok(shelf)
    }

    /// The primaries this node holds shadows of.
    pub fn primaries(&self) -> Vec<NodeId> {
        self.shelves().keys().copied().collect()
    }

    /// How many shadows this node holds, per primary (for `ctl nodes`).
    pub fn counts(&self) -> BTreeMap<NodeId, usize> {
        self.shelves()
            .iter()
            .map(|(p, s)| (*p, s.held().len()))
            .collect()
    }

    /// The shadows of `primary` as they now stand, in id order:
    /// recipients the primary reported done are `Done`.
    pub fn envelopes(&self, primary: NodeId) -> Vec<Envelope> {
        match self.shelf(primary) {
            Some(s) => s.held().values().cloned().collect(),
            None => Vec::new(),
        }
    }

    /// The content of `primary`'s message `id`.
    pub async fn body(&self, primary: NodeId, id: QueueId) -> Result<Bytes, SpoolError> {
        let shelf = self.shelf(primary).ok_or(SpoolError::NotFound(id))?;
        shelf.spool.body(id).await
    }

    /// Take `primary`'s shadows over: from now on its copies and progress
    /// are refused here; returns every shadow it had with its content.
    /// They stay on disk until [`Holder::forget`], so the caller stores
    /// them in its own queue first.
    pub async fn take(&self, primary: NodeId) -> Result<Vec<(Envelope, Bytes)>, SpoolError> {
        {
            let mut taken = self.inner.taken.lock().unwrap_or_else(|e| e.into_inner());
            taken.insert(primary);
        }
        let mut out = Vec::new();
        for envelope in self.envelopes(primary) {
            let body = self.body(primary, envelope.id).await?;
            out.push((envelope, body));
        }
        Ok(out)
    }

    /// Delete every shadow of `primary` (after a takeover, once they are
    /// in this node's own queue).
    pub fn forget(&self, primary: NodeId) -> Result<(), SpoolError> {
        let shelf = self.shelves().remove(&primary);
        if let Some(shelf) = shelf {
            shelf.held().clear();
            drop(shelf);
            std::fs::remove_dir_all(primary_dir(&self.inner.dir, primary))?;
        }
        Ok(())
    }

    /// Durably forget `primary`'s shadow `id` (finished, or never to be
    /// delivered by this node).
    pub async fn discard(&self, primary: NodeId, id: QueueId) -> Result<(), SpoolError> {
        let Some(shelf) = self.shelf(primary) else {
            return Ok(());
        };
        discard(&shelf, vec![id]).await
    }

    fn staging(&self) -> MutexGuard<'_, Staging> {
        self.inner.staging.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep a copy of `primary`'s message (its head from the parts
    /// received before, if it came in parts).
    pub async fn store(&self, primary: NodeId, m: ShadowMessage) -> Result<(), SpoolError> {
        let body = match m.staged {
            0 => m.body,
            n => {
                let mut head = self.staging().take((primary, m.id), n).ok_or_else(|| {
                    SpoolError::Corrupt(format!("the first {n} bytes did not all arrive"))
                })?;
                head.extend_from_slice(&m.body);
                head.freeze()
            }
        };
        let shelf = self.shelf_or_open(primary)?;
        let envelope = Envelope {
            id: QueueId(m.id),
            sender: m.sender,
            recipients: m
                .recipients
                .into_iter()
                .map(|r| Recipient {
                    address: r.address,
                    state: match r.done {
                        true => RcptState::Done,
                        false => RcptState::Pending { attempts: 0 },
                    },
                })
                .collect(),
            arrived_ms: m.arrived_ms,
            holders: Vec::new(),
        };
        shelf.spool.store(envelope.clone(), body).await?;
        shelf.held().insert(envelope.id, envelope);
        crate::metrics::shadow_stored();
        Ok(())
    }

    /// Record `primary`'s progress: recipients done, messages finished.
    /// All writes go to the spool together: one fsync for the batch.
    pub async fn progress(
        &self,
        primary: NodeId,
        done: Vec<(u64, Vec<u32>)>,
        removed: Vec<u64>,
    ) -> Result<(), SpoolError> {
        let Some(shelf) = self.shelf(primary) else {
            return Ok(());
        };
        let mut updates = Vec::new();
        let mut finished: Vec<QueueId> = removed.into_iter().map(QueueId).collect();
        {
            let mut held = shelf.held();
            for (id, indexes) in done {
                let id = QueueId(id);
                let Some(e) = held.get_mut(&id) else { continue };
                let changes: Vec<(usize, RcptState)> = indexes
                    .into_iter()
                    .map(|i| (i as usize, RcptState::Done))
                    .filter(|(i, _)| *i < e.recipients.len())
                    .collect();
                for (i, state) in &changes {
                    e.recipients[*i].state = state.clone();
                }
                if e.is_finished() {
                    finished.push(id);
                } else if !changes.is_empty() {
                    updates.push((id, changes));
                }
            }
        }
        let spool = shelf.spool.clone();
        let writes = updates.into_iter().map(|(id, c)| spool.update(id, c));
        let (updated, removed) = tokio::join!(join_all(writes), discard(&shelf, finished));
        updated.into_iter().collect::<Result<Vec<()>, _>>()?;
        removed
    }

    /// Forget `primary`'s shadows below `below` that are not in `keep`
    /// (sorted): the primary no longer has them. Returns how many went.
    pub async fn reconcile(
        &self,
        primary: NodeId,
        keep: &[u64],
        below: u64,
    ) -> Result<u64, SpoolError> {
        let Some(shelf) = self.shelf(primary) else {
            return Ok(0);
        };
        let gone: Vec<QueueId> = shelf
            .held()
            .keys()
            .filter(|id| id.0 < below && keep.binary_search(&id.0).is_err())
            .copied()
            .collect();
        let n = gone.len() as u64;
        discard(&shelf, gone).await?;
        Ok(n)
    }

    async fn answer(self, from: NodeId, req: ShadowRequest) -> ShadowReply {
        if self.is_taken(from) {
            return ShadowReply::Failed("this node has taken the primary's shadows over".into());
        }
        let failed = |e: SpoolError| ShadowReply::Failed(e.to_string());
        match req {
            ShadowRequest::Store { message } => {
                let id = message.id;
                match self.store(from, message).await {
                    Ok(()) => ShadowReply::Stored,
                    Err(e) => {
                        tracing::warn!(primary = %format_args!("{from:016x}"), queue_id = %QueueId(id), error = %e, "shadow copy not stored");
                        failed(e)
                    }
                }
            }
            ShadowRequest::Part { id, offset, bytes } => {
                match self.staging().add((from, id), offset, &bytes) {
                    Ok(()) => ShadowReply::Staged,
                    Err(why) => ShadowReply::Failed(why),
                }
            }
            ShadowRequest::Progress { done, removed } => {
                match self.progress(from, done, removed).await {
                    Ok(()) => ShadowReply::Applied,
                    Err(e) => failed(e),
                }
            }
            ShadowRequest::Reconcile { keep, below } => {
                match self.reconcile(from, &keep, below).await {
                    Ok(discarded) => ShadowReply::Reconciled { discarded },
                    Err(e) => failed(e),
                }
            }
        }
    }
}

impl ShadowHandler for Holder {
    fn handle(&self, from: NodeId, req: ShadowRequest) -> BoxFuture<'static, ShadowReply> {
        Box::pin(self.clone().answer(from, req))
    }
}

fn open_shelf(dir: &Path, limits: Limits) -> Result<Shelf, SpoolError> {
    let spool = DiskSpool::open_shadows(dir, limits)?;
    let held = spool
        .recovered()
        .into_iter()
        .map(|r| (r.envelope.id, r.envelope))
        .collect();
    Ok(Shelf {
        spool: Arc::new(spool),
        held: Mutex::new(held),
    })
}

/// Durably remove `ids` from `shelf`, together (one fsync).
async fn discard(shelf: &Shelf, ids: Vec<QueueId>) -> Result<(), SpoolError> {
    let ids: Vec<QueueId> = {
        let mut held = shelf.held();
        ids.into_iter()
            .filter(|id| held.remove(id).is_some())
            .collect()
    };
    let results = join_all(ids.into_iter().map(|id| shelf.spool.remove(id))).await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(())
}

#[cfg(test)]
#[path = "holder_tests.rs"]
mod tests;
