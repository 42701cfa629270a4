//! An in-memory spool for tests, with injectable faults.
//!
//! It behaves like the durable spool (same trait, same errors) but keeps
//! everything in memory; `reopen` simulates a restart that recovers what
//! was "durable", and the fault switches simulate a failing fsync or a
//! full disk so tests can prove nothing is acknowledged then.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{Envelope, QueueId, RcptState, Recovered, Spool, SpoolError, SpoolFuture};

#[derive(Default)]
struct Faults {
    fsync: AtomicBool,
    full: AtomicBool,
    /// Writes (and probes) wait until this turns false.
    hung: tokio::sync::watch::Sender<bool>,
}

/// A spool held in memory; clones share the same contents.
#[derive(Clone, Default)]
pub struct MemorySpool {
    messages: Arc<Mutex<BTreeMap<QueueId, (Envelope, Bytes)>>>,
    faults: Arc<Faults>,
    recovered: Vec<Recovered>,
}

impl MemorySpool {
    /// An empty spool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Make every following write fail as if fsync returned EIO (or recover).
    pub fn fail_fsync(&self, fail: bool) {
        self.faults.fsync.store(fail, Ordering::SeqCst);
    }

    /// Make every following write fail as if the disk were full (or recover).
    pub fn set_full(&self, full: bool) {
        self.faults.full.store(full, Ordering::SeqCst);
    }

    /// Make every following write and probe wait, as behind an fsync that
    /// never returns (or let them go on).
    pub fn hang(&self, hung: bool) {
        self.faults.hung.send_replace(hung);
    }

    /// Until the spool is not hung.
    async fn unhung(&self) {
        let mut hung = self.faults.hung.subscribe();
        let _ = hung.wait_for(|h| !h).await;
    }

    /// Put a message in place directly, bypassing fault injection (test setup).
    pub fn insert(&self, envelope: Envelope, body: Bytes) {
        let mut m = self.messages.lock().expect("spool");
        m.insert(envelope.id, (envelope, body));
    }

    /// Messages currently stored, in id order.
    pub fn envelopes(&self) -> Vec<Envelope> {
        let m = self.messages.lock().expect("spool");
        m.values().map(|(e, _)| e.clone()).collect()
    }

    /// A new spool over the same contents, as after a restart: its
    /// `recovered` lists every unfinished message.
    pub fn reopen(&self) -> Self {
        let recovered = self
            .envelopes()
            .into_iter()
            .filter(|e| !e.is_finished())
            .map(|envelope| Recovered { envelope })
            .collect();
        Self {
            messages: self.messages.clone(),
            faults: Arc::new(Faults::default()),
            recovered,
        }
    }

    fn check(&self) -> Result<(), SpoolError> {
        if self.faults.full.load(Ordering::SeqCst) {
            return Err(SpoolError::Full);
        }
        if self.faults.fsync.load(Ordering::SeqCst) {
            return Err(SpoolError::Io(std::io::Error::other(
                "injected fsync failure",
            )));
        }
        Ok(())
    }
}

impl Spool for MemorySpool {
    fn store(&self, envelope: Envelope, body: Bytes) -> SpoolFuture<'_, ()> {
        let r = self.check().map(|()| {
            let mut m = self.messages.lock().expect("spool");
            m.insert(envelope.id, (envelope, body));
        });
        Box::pin(async move {
            self.unhung().await;
            r
        })
    }

    fn update(&self, id: QueueId, changes: Vec<(usize, RcptState)>) -> SpoolFuture<'_, ()> {
        let r = self.check().and_then(|()| {
            let mut m = self.messages.lock().expect("spool");
            let (env, _) = m.get_mut(&id).ok_or(SpoolError::NotFound(id))?;
            for (i, state) in changes {
                if let Some(r) = env.recipients.get_mut(i) {
                    r.state = state;
                }
            }
            Ok(())
        });
        Box::pin(async move {
            self.unhung().await;
            r
        })
    }

    fn remove(&self, id: QueueId) -> SpoolFuture<'_, ()> {
        let r = self.check().map(|()| {
            self.messages.lock().expect("spool").remove(&id);
        });
        Box::pin(async move {
            self.unhung().await;
            r
        })
    }

    fn set_holders(&self, id: QueueId, holders: Vec<u64>) -> SpoolFuture<'_, ()> {
        let r = self.check().and_then(|()| {
            let mut m = self.messages.lock().expect("spool");
            let (env, _) = m.get_mut(&id).ok_or(SpoolError::NotFound(id))?;
            env.holders = holders;
            Ok(())
        });
        Box::pin(async move {
            self.unhung().await;
            r
        })
    }

    fn body(&self, id: QueueId) -> SpoolFuture<'_, Bytes> {
        let r = self
            .messages
            .lock()
            .expect("spool")
            .get(&id)
            .map(|(_, b)| b.clone())
            .ok_or(SpoolError::NotFound(id));
        Box::pin(async move { r })
    }

    fn recovered(&self) -> Vec<Recovered> {
        self.recovered.clone()
    }

    fn probe(&self) -> SpoolFuture<'_, ()> {
        Box::pin(async move {
            self.unhung().await;
            Ok(())
        })
    }
}
