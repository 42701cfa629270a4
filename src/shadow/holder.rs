//! The holder side: shadow copies of other nodes' messages, one spool per
//! primary under `<data_dir>/shadows/<primary as 16 hex digits>/`.
//!
//! Each is an ordinary [`DiskSpool`], so a copy is group-committed with
//! concurrent copies and fsynced before the primary hears "stored", and
//! the shadows survive a restart of the holder. A primary's spool is
//! opened when its first copy arrives, or at start when its directory
//! exists.
//!
//! A takeover *detaches* a primary's shelf: its directory is renamed to
//! `<primary>.taken-<epoch>` while no copy is being stored, so what was
//! there before the takeover and what the primary sends after it (back
//! under a new delivery epoch) never mix; `<primary>.done` then records
//! the epoch, and a restart resumes any detached shelf it finds.

use std::collections::BTreeMap;
use std::fs::File;
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
    /// Copies are stored under its read side; a detach takes the write
    /// side, so no copy lands half before and half after it.
    fence: tokio::sync::RwLock<()>,
    /// Whether a primary's copies are taken now; None: all are.
    admit: std::sync::RwLock<Option<Admit>>,
    /// Per primary: the last takeover epoch dealt with.
    done: Mutex<BTreeMap<NodeId, u64>>,
    /// Shelves detached before a restart, still to be taken over.
    detached: Mutex<Vec<Detached>>,
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

/// Says whether a primary's copy, sent under the delivery epoch it
/// names, may be stored now (Err: why not).
pub type Admit = Arc<dyn Fn(NodeId, u64) -> Result<(), String> + Send + Sync>;

/// A primary's shadows as they stood at a takeover, no longer receiving
/// anything: the taker stores each in its own queue, then finishes it.
pub struct Detached {
    /// The primary.
    pub primary: NodeId,
    /// The takeover's epoch.
    pub epoch: u64,
    shelf: Arc<Shelf>,
    dir: PathBuf,
}

impl Detached {
    /// The shadows left, in id order, as they now stand.
    pub fn envelopes(&self) -> Vec<Envelope> {
        self.shelf.held().values().cloned().collect()
    }

    /// The content of shadow `id`.
    pub async fn body(&self, id: QueueId) -> Result<Bytes, SpoolError> {
        self.shelf.spool.body(id).await
    }

    /// Durably drop shadow `id`: it is in the taker's queue now.
    pub async fn discard(&self, id: QueueId) -> Result<(), SpoolError> {
        discard(&self.shelf, vec![id]).await
    }

    /// Every shadow was taken: delete the shelf.
    pub fn finish(self) -> Result<(), SpoolError> {
        drop(self.shelf);
        std::fs::remove_dir_all(&self.dir)?;
        Ok(())
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
        let mut done: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut detached = Vec::new();
        let hex = |n: &str| {
            (n.len() == 16)
                .then(|| u64::from_str_radix(n, 16).ok())
                .flatten()
        };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_str().unwrap_or_default();
            let (primary, rest) = name.split_at(name.len().min(16));
            let Some(primary) = hex(primary) else {
                continue;
            };
            if rest.is_empty() {
                shelves.insert(primary, Arc::new(open_shelf(&entry.path(), limits)?));
            } else if rest == ".done" {
                let text = std::fs::read_to_string(entry.path())?;
                let epoch = text.trim().parse().unwrap_or(0);
                let d = done.entry(primary).or_default();
                *d = (*d).max(epoch);
            } else if let Some(epoch) = rest.strip_prefix(".taken-").and_then(|e| e.parse().ok()) {
                let d = done.entry(primary).or_default();
                *d = (*d).max(epoch);
                detached.push(Detached {
                    primary,
                    epoch,
                    shelf: Arc::new(open_shelf(&entry.path(), limits)?),
                    dir: entry.path(),
                });
            }
        }
        Ok(Holder {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                limits,
                shelves: Mutex::new(shelves),
                fence: tokio::sync::RwLock::new(()),
                admit: std::sync::RwLock::new(None),
                done: Mutex::new(done),
                detached: Mutex::new(detached),
                staging: Mutex::default(),
            }),
        })
    }

    /// From now on, store a primary's copies only when `admit` says so.
    pub fn admit_with(&self, admit: Admit) {
        *self.inner.admit.write().unwrap_or_else(|e| e.into_inner()) = Some(admit);
    }

    /// The last takeover epoch of `primary` dealt with here (0: none).
    pub fn done(&self, primary: NodeId) -> u64 {
        let done = self.inner.done.lock().unwrap_or_else(|e| e.into_inner());
        done.get(&primary).copied().unwrap_or(0)
    }

    /// Shelves a takeover detached before a restart, to finish now.
    pub fn resume(&self) -> Vec<Detached> {
        std::mem::take(
            &mut *self
                .inner
                .detached
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Deal with `primary`'s takeover under `epoch`: when `take`, detach
    /// its shelf (None if it had none here) — copies stored until now are
    /// in it, later ones are not; either way record the epoch as done.
    pub async fn detach(
        &self,
        primary: NodeId,
        epoch: u64,
        take: bool,
    ) -> Result<Option<Detached>, SpoolError> {
        let _fence = self.inner.fence.write().await;
        let shelf = match take {
            true => self.shelves().remove(&primary),
            false => None,
        };
        let detached = match shelf {
            Some(shelf) => {
                let dir = self.inner.dir.join(format!("{primary:016x}.taken-{epoch}"));
                std::fs::rename(primary_dir(&self.inner.dir, primary), &dir)?;
                Some(Detached {
                    primary,
                    epoch,
                    shelf,
                    dir,
                })
            }
            None => None,
        };
        let marker = self.inner.dir.join(format!("{primary:016x}.done"));
        std::fs::write(&marker, epoch.to_string())?;
        File::open(&marker)?.sync_all()?;
        File::open(&self.inner.dir)?.sync_all()?;
        let mut done = self.inner.done.lock().unwrap_or_else(|e| e.into_inner());
        done.insert(primary, epoch);
        Ok(detached)
    }

    fn shelves(&self) -> MutexGuard<'_, BTreeMap<NodeId, Arc<Shelf>>> {
        self.inner.shelves.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shelf(&self, primary: NodeId) -> Option<Arc<Shelf>> {
        self.shelves().get(&primary).cloned()
    }

    fn admitted(&self, primary: NodeId, epoch: u64) -> Result<(), String> {
        let admit = self.inner.admit.read().unwrap_or_else(|e| e.into_inner());
        admit.as_ref().map_or(Ok(()), |a| a(primary, epoch))
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
        let failed = |e: SpoolError| ShadowReply::Failed(e.to_string());
        match req {
            ShadowRequest::Store { message } => {
                let _fence = self.inner.fence.read().await;
                if let Err(why) = self.admitted(from, message.epoch) {
                    return ShadowReply::Failed(why);
                }
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
