//! Shared helpers for integration tests: a scripted SMTP peer, an in-memory
//! spool stand-in, and a capture of structured association events.

#![allow(dead_code)]

pub mod client;
pub mod daemon;
pub mod knot;
pub mod lab;
pub mod loopfs;
pub mod nemesis;
pub mod netns;
pub mod node;
pub mod peer;
pub mod proxy;
pub mod shadows;
pub mod wire;

use std::cell::RefCell;
use std::sync::Once;

use bytes::Bytes;
use mtad::spool::{Envelope, MemorySpool, QueueId};
use tokio::sync::watch;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// The memory spool, with a shortcut that stores a bare message body.
#[derive(Default)]
pub struct MemSpool(pub MemorySpool);

impl MemSpool {
    /// Make `body` readable as message `id`.
    pub fn put(&self, id: QueueId, body: impl Into<Bytes>) {
        let envelope = Envelope {
            id,
            sender: String::new(),
            recipients: Vec::new(),
            arrived_ms: 0,
            holders: Vec::new(),
        };
        self.0.insert(envelope, body.into());
    }
}

impl std::ops::Deref for MemSpool {
    type Target = MemorySpool;
    fn deref(&self) -> &MemorySpool {
        &self.0
    }
}

/// One `association_*` event as logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssocEvent {
    /// `association_opened`, `association_closed`, ...
    pub event: String,
    /// The association id.
    pub association: u64,
    /// The destination name.
    pub destination: String,
    /// The next hop.
    pub next_hop: String,
    /// Why.
    pub reason: String,
    /// Free text.
    pub detail: String,
}

impl Visit for AssocEvent {
    fn record_str(&mut self, field: &Field, value: &str) {
        let v = value.to_string();
        match field.name() {
            "event" => self.event = v,
            "destination" => self.destination = v,
            "next_hop" => self.next_hop = v,
            "reason" => self.reason = v,
            "detail" => self.detail = v,
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "association" {
            self.association = value;
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

thread_local! {
    static SINK: RefCell<Option<watch::Sender<Vec<AssocEvent>>>> = const { RefCell::new(None) };
}

/// One global subscriber feeding per-thread sinks: thread-local default
/// subscribers race with callsite interest caching when tests run in
/// parallel, and then events go missing.
struct Capture;

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != mtad::events::TARGET {
            return;
        }
        let mut e = AssocEvent::default();
        event.record(&mut e);
        if e.event.starts_with("association_") {
            SINK.with(|s| {
                if let Some(tx) = &*s.borrow() {
                    tx.send_modify(|v| v.push(e));
                }
            });
        }
    }
}

/// Association events logged on this thread while it lives (tests run on
/// a current-thread runtime, so spawned tasks log here too).
pub struct Events {
    tx: watch::Sender<Vec<AssocEvent>>,
}

impl Drop for Events {
    fn drop(&mut self) {
        SINK.with(|s| s.borrow_mut().take());
    }
}

impl Events {
    /// Start capturing.
    pub fn capture() -> Self {
        static INIT: Once = Once::new();
        INIT.call_once(|| {
            let _ = tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(Capture),
            );
        });
        let (tx, _) = watch::channel(Vec::new());
        SINK.with(|s| *s.borrow_mut() = Some(tx.clone()));
        Self { tx }
    }

    /// Everything so far.
    pub fn all(&self) -> Vec<AssocEvent> {
        self.tx.borrow().clone()
    }

    /// How many `association_{kind}` events with `reason` so far.
    pub fn count(&self, kind: &str, reason: &str) -> usize {
        let kind = format!("association_{kind}");
        self.tx
            .borrow()
            .iter()
            .filter(|e| e.event == kind && e.reason == reason)
            .count()
    }

    /// Wait until `n` `association_{kind}` events with `reason` were logged.
    pub async fn wait(&self, kind: &str, reason: &str, n: usize) {
        let kind = format!("association_{kind}");
        let mut rx = self.tx.subscribe();
        rx.wait_for(|v| {
            v.iter()
                .filter(|e| e.event == kind && e.reason == reason)
                .count()
                >= n
        })
        .await
        .unwrap();
    }
}
