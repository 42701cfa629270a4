//! Structured events: one per message state change and one per association
//! change. They are ordinary `tracing` events under the target
//! `mtad::event`, so the JSON formatter turns each into one line.

use crate::spool::QueueId;

/// The tracing target every structured event uses.
pub const TARGET: &str = "mtad::event";

/// A message state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageEvent {
    /// Accepted from a client and durable.
    Received,
    /// Placed on a destination's queue.
    Queued,
    /// Accepted by the next hop (or written to the drop directory).
    Delivered,
    /// Temporarily failed; will be retried.
    Deferred,
    /// Permanently failed; a DSN goes to the sender.
    Bounced,
    /// Too old to retry; a DSN goes to the sender.
    Expired,
    /// Held by an operator: nothing is dispatched until released.
    Held,
    /// Released from a hold.
    Released,
    /// Deleted by an operator, with no notice to anyone.
    Deleted,
}

impl MessageEvent {
    /// The name written in the `event` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Deferred => "deferred",
            Self::Bounced => "bounced",
            Self::Expired => "expired",
            Self::Held => "held",
            Self::Released => "released",
            Self::Deleted => "deleted",
        }
    }
}

/// Log one message state change for one recipient (or all, when `rcpt`
/// lists several addresses joined by commas).
pub fn message(
    kind: MessageEvent,
    id: QueueId,
    sender: &str,
    rcpt: &str,
    next_hop: Option<&str>,
    reply: Option<&str>,
) {
    crate::metrics::recipient(kind.as_str(), next_hop.unwrap_or(""));
    tracing::info!(
        target: TARGET,
        event = kind.as_str(),
        queue_id = %id,
        sender = sender,
        rcpt = rcpt,
        next_hop = next_hop.unwrap_or(""),
        reply = reply.unwrap_or(""),
    );
}

/// How many copies of a message exist on distinct members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopiesEvent {
    /// Accepted, or left by a holder that went down, with fewer copies
    /// than `[spool] replicas`.
    Underreplicated,
    /// Every copy wanted exists again.
    Replicated,
    /// Refused (`451 4.4.0`): fewer copies than `[spool] min_replicas`.
    NotEnoughCopies,
}

impl CopiesEvent {
    /// The name written in the `event` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Underreplicated => "underreplicated",
            Self::Replicated => "replicated",
            Self::NotEnoughCopies => "not_enough_copies",
        }
    }
}

/// Log that message `id` has `copies` durable copies (its own included)
/// where `wanted` are asked for.
pub fn copies(kind: CopiesEvent, id: QueueId, copies: usize, wanted: usize) {
    match kind {
        CopiesEvent::Replicated => tracing::info!(
            target: TARGET,
            event = kind.as_str(),
            queue_id = %id,
            copies,
            wanted,
        ),
        _ => tracing::warn!(
            target: TARGET,
            event = kind.as_str(),
            queue_id = %id,
            copies,
            wanted,
        ),
    }
}

/// Log that this node took over message `original` of the fenced node
/// `primary` (incarnation, hex) from its shadow copy, as `id`.
pub fn taken_over(id: QueueId, primary: u64, original: QueueId, sender: &str, rcpts: usize) {
    tracing::info!(
        target: TARGET,
        event = "taken_over",
        queue_id = %id,
        primary = %format_args!("{primary:016x}"),
        original_id = %original,
        sender = sender,
        rcpts = rcpts,
    );
}

/// Log that this node dropped its message `id`: a node that took over
/// its shadow copies while it was fenced delivers it.
pub fn given_up(id: QueueId, taker: u64) {
    tracing::info!(
        target: TARGET,
        event = "given_up",
        queue_id = %id,
        taker = %format_args!("{taker:016x}"),
    );
}

/// Log a message accepted from `client` (an address, or "local" for
/// messages mtad makes itself, such as DSNs).
pub fn received(id: QueueId, sender: &str, rcpts: &str, client: &str, user: &str, reply: &str) {
    crate::metrics::received();
    tracing::info!(
        target: TARGET,
        event = MessageEvent::Received.as_str(),
        queue_id = %id,
        sender = sender,
        rcpt = rcpts,
        client = client,
        // Who authenticated (SMTP AUTH); empty if nobody did.
        user = user,
        reply = reply,
    );
}

/// Log a client's SMTP session opening on `listener`.
pub fn connected(client: std::net::SocketAddr, listener: &str) {
    tracing::info!(
        target: TARGET,
        event = "connected",
        client = %client,
        listener = listener,
    );
}

/// What a session did, for its `disconnected` event.
#[derive(Debug, Default)]
pub struct SessionTally {
    /// Messages acknowledged with 250.
    pub messages: std::sync::atomic::AtomicU32,
    /// Replies with a 4xx or 5xx code.
    pub rejected: std::sync::atomic::AtomicU32,
}

/// Log a client's SMTP session ending after `duration_ms`, with what it
/// did and why it ended (`quit or closed`, or the connection error).
pub fn disconnected(
    client: std::net::SocketAddr,
    tally: &SessionTally,
    duration_ms: u64,
    why: &str,
) {
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        target: TARGET,
        event = "disconnected",
        client = %client,
        messages = tally.messages.load(Relaxed),
        rejected = tally.rejected.load(Relaxed),
        duration_ms = duration_ms,
        reason = why,
    );
}

/// Log a client turned away before its session began: `reason` is
/// `draining`, `busy`, `too_many_from_address` or `too_fast_from_address`.
pub fn refused(client: std::net::SocketAddr, reason: &str, reply: &str) {
    tracing::info!(
        target: TARGET,
        event = "refused",
        client = %client,
        reason = reason,
        reply = reply.trim_end(),
    );
}

/// What happened to an association.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssociationEvent {
    /// A new session to the next hop is ready.
    Opened,
    /// An existing session took another transaction.
    Reused,
    /// Closed on purpose and replaced by a fresh one.
    Renegotiated,
    /// Closed.
    Closed,
}

impl AssociationEvent {
    /// The name written in the `event` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opened => "association_opened",
            Self::Reused => "association_reused",
            Self::Renegotiated => "association_renegotiated",
            Self::Closed => "association_closed",
        }
    }
}

/// Why an association was opened, renegotiated or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssociationReason {
    /// The first association for a destination with work.
    Demand,
    /// Backlog per association reached the threshold.
    Threshold,
    /// It reached its lifetime.
    Lifetime,
    /// It carried its maximum number of messages.
    Count,
    /// It had nothing to do for the idle timeout.
    Idle,
    /// It had work but made no progress for the stall timeout.
    Stall,
    /// A network or protocol error.
    Error,
    /// The node is shutting down.
    Shutdown,
    /// Its source address was withdrawn: the group it left from moved
    /// away, and the next owner holds the address now.
    Withdrawn,
}

impl AssociationReason {
    /// The name written in the `reason` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Demand => "demand",
            Self::Threshold => "threshold",
            Self::Lifetime => "lifetime",
            Self::Count => "count",
            Self::Idle => "idle",
            Self::Stall => "stall",
            Self::Error => "error",
            Self::Shutdown => "shutdown",
            Self::Withdrawn => "withdrawn",
        }
    }
}

/// Log one association change.
pub fn association(
    kind: AssociationEvent,
    association: u64,
    destination: &str,
    next_hop: &str,
    reason: AssociationReason,
    detail: &str,
) {
    crate::metrics::association(kind.as_str(), destination, reason.as_str());
    tracing::info!(
        target: TARGET,
        event = kind.as_str(),
        association = association,
        destination = destination,
        next_hop = next_hop,
        reason = reason.as_str(),
        detail = detail,
    );
}

/// Keeps the log writer thread alive; dropping it flushes what is queued.
pub type LogGuard = tracing_appender::non_blocking::WorkerGuard;

/// The running log: keep it alive while logging (dropping it flushes),
/// and change its level on a reload.
pub struct Logging {
    _guard: LogGuard,
    set_level: SetLevel,
}

/// Changes the running log's filter.
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

impl Logging {
    /// Log at `level` (an `EnvFilter` directive such as `info` or
    /// `mtad=debug`) from now on.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        (self.set_level)(level)
    }
}

/// Install the global log subscriber: JSON lines or human text on stdout,
/// filtered by `level` (a tracing filter such as `info`).
///
/// Lines go through a writer thread with a buffered stdout, flushed
/// whenever the queue runs dry: a slow reader of stdout (journald, a pipe)
/// never stalls the runtime, and a busy node makes one write per batch of
/// lines instead of one per line. The queue is not lossy: logs are the
/// audit trail of every message, so when it is full, logging waits.
pub fn init(format: crate::config::LogFormat, level: &str) -> Logging {
    use tracing_subscriber::EnvFilter;
    let stdout = std::io::stdout();
    let ansi = std::io::IsTerminal::is_terminal(&stdout);
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::with_capacity(64 * 1024, stdout));
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    fn setter<L, S: 'static>(h: tracing_subscriber::reload::Handle<L, S>) -> SetLevel
    where
        L: From<EnvFilter> + Send + Sync + 'static,
    {
        Box::new(move |level| {
            let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            h.reload(f).map_err(|e| e.to_string())
        })
    }
    let set_level = match format {
        crate::config::LogFormat::Json => {
            let b = builder.json().flatten_event(true).with_current_span(false);
            let b = b.with_filter_reloading();
            let h = setter(b.reload_handle());
            let _ = b.try_init();
            h
        }
        // Colour only for a person at a terminal, never into journald or files.
        crate::config::LogFormat::Text => {
            let b = builder.with_ansi(ansi).with_filter_reloading();
            let h = setter(b.reload_handle());
            let _ = b.try_init();
            h
        }
    };
    Logging {
        _guard: guard,
        set_level,
    }
}
