//! A spool on fjall, with the same group commit as mtad's `DiskSpool`.
//!
//! Keyspace `env` maps the queue id (big endian) to the encoded envelope,
//! keyspace `body` maps it to the content; the two are written in one
//! atomic write batch. The journal is persisted manually: one committer
//! thread takes every pending request off its channel (up to the same
//! 16 MiB of content as mtad's writer), applies them all as one write
//! batch, calls `persist(SyncData)` once, then answers all of them —
//! exactly mtad's writer loop, so what differs is the storage engine.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use mtad::spool::{Envelope, QueueId, RcptState, Recipient};
use tokio::sync::{mpsc, oneshot};

/// Same as mtad's `BATCH_LIMIT`.
const BATCH_LIMIT: usize = 16 << 20;

enum Op {
    Store(Envelope, Bytes),
    Remove(QueueId),
}

struct Request {
    op: Op,
    done: oneshot::Sender<Result<(), String>>,
}

pub struct FjallSpool {
    tx: Option<mpsc::UnboundedSender<Request>>,
    committer: Option<JoinHandle<()>>,
    batches: Arc<AtomicU64>,
}

fn open_db(dir: &Path) -> fjall::Result<(Database, Keyspace, Keyspace)> {
    let db = Database::builder(dir).manual_journal_persist(true).open()?;
    let opts = || KeyspaceCreateOptions::default().manual_journal_persist(true);
    let env = db.keyspace("env", opts)?;
    let body = db.keyspace("body", opts)?;
    Ok((db, env, body))
}

impl FjallSpool {
    pub fn open(dir: &Path) -> fjall::Result<Self> {
        Self::open_recover(dir).map(|(s, _)| s)
    }

    /// Open and list every stored envelope, as `DiskSpool::open` +
    /// `recovered()` does.
    pub fn open_recover(dir: &Path) -> fjall::Result<(Self, Vec<Envelope>)> {
        let (db, env, body) = open_db(dir)?;
        let mut recovered = Vec::new();
        for kv in env.iter() {
            let (k, v) = kv.into_inner()?;
            let id = QueueId(u64::from_be_bytes(k[..8].try_into().expect("8-byte key")));
            recovered.push(decode_envelope(id, &v));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let batches = Arc::new(AtomicU64::new(0));
        let b = batches.clone();
        let committer = std::thread::Builder::new()
            .name("fjall-spool".into())
            .spawn(move || commit_loop(db, env, body, rx, b))
            .expect("spawn committer");
        Ok((
            Self {
                tx: Some(tx),
                committer: Some(committer),
                batches,
            },
            recovered,
        ))
    }

    fn submit(&self, op: Op) -> impl std::future::Future<Output = Result<(), String>> + Send {
        let (done, wait) = oneshot::channel();
        let sent = self.tx.as_ref().expect("open").send(Request { op, done });
        async move {
            sent.map_err(|_| "closed".to_string())?;
            wait.await.map_err(|_| "closed".to_string())?
        }
    }

    pub fn store(
        &self,
        env: Envelope,
        body: Bytes,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send {
        self.submit(Op::Store(env, body))
    }

    pub fn remove(&self, id: QueueId) -> impl std::future::Future<Output = Result<(), String>> + Send {
        self.submit(Op::Remove(id))
    }

    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Stop the committer and drop the database (which waits for fjall's
    /// background threads and releases its lock).
    pub fn close(mut self) {
        drop(self.tx.take());
        if let Some(c) = self.committer.take() {
            c.join().expect("committer");
        }
    }
}

fn commit_loop(
    db: Database,
    env: Keyspace,
    body: Keyspace,
    mut rx: mpsc::UnboundedReceiver<Request>,
    batches: Arc<AtomicU64>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        let mut size = 0;
        while size < BATCH_LIMIT {
            match rx.try_recv() {
                Ok(r) => {
                    if let Op::Store(_, b) = &r.op {
                        size += b.len();
                    }
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let mut wb = db.batch();
        for r in &batch {
            match &r.op {
                Op::Store(e, b) => {
                    let key = e.id.0.to_be_bytes();
                    wb.insert(&env, key, encode_envelope(e));
                    wb.insert(&body, key, &b[..]);
                }
                Op::Remove(id) => {
                    let key = id.0.to_be_bytes();
                    wb.remove(&env, key);
                    wb.remove(&body, key);
                }
            }
        }
        let result = wb
            .commit()
            .and_then(|()| db.persist(PersistMode::SyncData))
            .map_err(|e| e.to_string());
        batches.fetch_add(1, Ordering::Relaxed);
        for r in batch {
            let _ = r.done.send(result.clone());
        }
    }
}

fn encode_envelope(e: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + e.recipients.len() * 48);
    out.extend_from_slice(&e.arrived_ms.to_le_bytes());
    out.extend_from_slice(&(e.sender.len() as u32).to_le_bytes());
    out.extend_from_slice(e.sender.as_bytes());
    out.extend_from_slice(&(e.recipients.len() as u32).to_le_bytes());
    for r in &e.recipients {
        out.extend_from_slice(&(r.address.len() as u32).to_le_bytes());
        out.extend_from_slice(r.address.as_bytes());
        let state = match r.state {
            RcptState::Pending { attempts } => attempts,
            RcptState::Done => u32::MAX,
        };
        out.extend_from_slice(&state.to_le_bytes());
    }
    out
}

fn decode_envelope(id: QueueId, mut b: &[u8]) -> Envelope {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (h, t) = b.split_at(n);
        *b = t;
        h
    }
    fn u32_(b: &mut &[u8]) -> u32 {
        u32::from_le_bytes(take(b, 4).try_into().unwrap())
    }
    fn str_(b: &mut &[u8]) -> String {
        let n = u32_(b) as usize;
        String::from_utf8(take(b, n).to_vec()).expect("utf-8")
    }
    let arrived_ms = u64::from_le_bytes(take(&mut b, 8).try_into().unwrap());
    let sender = str_(&mut b);
    let n = u32_(&mut b) as usize;
    let recipients = (0..n)
        .map(|_| {
            let address = str_(&mut b);
            let state = match u32_(&mut b) {
                u32::MAX => RcptState::Done,
                attempts => RcptState::Pending { attempts },
            };
            Recipient { address, state }
        })
        .collect();
    Envelope {
        id,
        sender,
        recipients,
        arrived_ms,
        holders: Vec::new(),
    }
}
