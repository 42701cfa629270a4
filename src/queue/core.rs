//! The queue's bookkeeping, without I/O: which recipients of which message
//! go to which route, what is in flight, what is due for retry, and what
//! is finished. The driver feeds it events and carries out its actions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Config, Route};
use crate::delivery::{Job, JobRcpt, JobResult, Outcome, RcptResult};
use crate::dsn::Failure;
use crate::events::{self, MessageEvent};
use crate::spool::{Envelope, QueueId, RcptState};

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Hand a job to route `route`.
    Dispatch {
        /// Route index.
        route: usize,
        /// The route itself, as the configuration it was chosen in says.
        target: Arc<Route>,
        /// The job.
        job: Job,
    },
    /// Make recipient states durable; if `bounce` is set, first store a
    /// DSN for those failures; if `finished`, remove the message instead.
    Settle {
        /// The message as it now stands.
        envelope: Envelope,
        /// Recipients whose state changed.
        changes: Vec<(usize, RcptState)>,
        /// Recipients to report in a DSN (empty: none).
        bounce: Vec<Failure>,
        /// Every recipient is done: remove the message.
        finished: bool,
    },
}

pub(super) struct Entry {
    pub(super) envelope: Envelope,
    /// An operator holds it: nothing is dispatched until released.
    pub(super) held: bool,
    /// Recipients handed to a route whose result has not come back.
    pub(super) inflight: BTreeSet<usize>,
    /// Its keys in `Core::retries`, with the wall-clock time each is due.
    pub(super) retries: Vec<((Instant, u64), u64)>,
    /// The last next hop and reply that deferred or failed a recipient,
    /// and when (ms since the epoch).
    pub(super) last: Option<(String, String, u64)>,
    /// An operator bounced it while some recipients were in flight: what
    /// they do not deliver now is returned rather than retried.
    pub(super) bouncing: bool,
}

impl Entry {
    fn new(envelope: Envelope, held: bool) -> Entry {
        Entry {
            envelope,
            held,
            inflight: BTreeSet::new(),
            retries: Vec::new(),
            last: None,
            bouncing: false,
        }
    }
}

/// Counts of recipient outcomes since start, and what is queued now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages tracked (not yet finished).
    pub queued: usize,
    /// Recipients delivered.
    pub delivered: u64,
    /// Recipient deferrals (one per failed attempt).
    pub deferred: u64,
    /// Recipients bounced on a permanent failure.
    pub bounced: u64,
    /// Recipients expired.
    pub expired: u64,
}

/// The queue's state.
pub struct Core {
    /// By id, so oldest first (ids grow with time): operators page
    /// through them in that order.
    pub(super) messages: BTreeMap<QueueId, Entry>,
    pub(super) retries: BTreeMap<(Instant, u64), (usize, Job)>,
    seq: u64,
    stats: Stats,
}

/// The reply for recipients an operator bounced.
pub(super) const RETURNED: &str = "550 5.0.0 Returned to the sender by the postmaster";

/// Delay before attempt `attempts + 1`, given `attempts` made so far (≥ 1).
pub fn retry_delay(schedule: &[Duration], attempts: u32) -> Duration {
    let i = (attempts.max(1) as usize - 1).min(schedule.len().saturating_sub(1));
    schedule.get(i).copied().unwrap_or(Duration::from_secs(300))
}

impl Default for Core {
    fn default() -> Self {
        Self::new()
    }
}

impl Core {
    /// An empty queue.
    pub fn new() -> Self {
        Self {
            messages: BTreeMap::new(),
            retries: BTreeMap::new(),
            seq: 0,
            stats: Stats::default(),
        }
    }

    /// Outcome counts so far.
    pub fn stats(&self) -> Stats {
        Stats {
            queued: self.messages.len(),
            ..self.stats
        }
    }

    /// Messages being tracked.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether no message is tracked.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// When the next retry is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.retries.keys().next().map(|(t, _)| *t)
    }

    /// Take in a durable message (new or recovered) and dispatch its
    /// pending recipients, one job per route — unless it is `held`.
    pub fn admit(
        &mut self,
        cfg: &Config,
        envelope: Envelope,
        held: bool,
        now: Instant,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let id = envelope.id;
        self.messages.insert(id, Entry::new(envelope, held));
        if !held {
            self.send_waiting(cfg, id, now, now_ms, out);
        }
    }

    /// Dispatch every pending recipient of `id` that is neither in flight
    /// nor held, at once (its scheduled retries are cancelled).
    pub(super) fn send_waiting(
        &mut self,
        cfg: &Config,
        id: QueueId,
        now: Instant,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(e) = self.messages.get_mut(&id) else {
            return;
        };
        for (key, _) in e.retries.drain(..) {
            self.retries.remove(&key);
        }
        let waiting: Vec<usize> = (0..e.envelope.recipients.len())
            .filter(|i| e.envelope.recipients[*i].state != RcptState::Done)
            .filter(|i| !e.inflight.contains(i))
            .collect();
        self.send(cfg, id, &waiting, now, now_ms, out);
    }

    /// Forget `id` and its scheduled retries (results still in flight
    /// for it are then ignored).
    pub(super) fn remove(&mut self, id: QueueId) -> Option<Entry> {
        let e = self.messages.remove(&id)?;
        for (key, _) in &e.retries {
            self.retries.remove(key);
        }
        Some(e)
    }

    /// The messages held now.
    pub fn held(&self) -> Vec<QueueId> {
        let held = self.messages.iter().filter(|(_, e)| e.held);
        held.map(|(id, _)| *id).collect()
    }

    /// Route and dispatch recipients `indices` of `id`; those no route
    /// serves fail.
    fn send(
        &mut self,
        cfg: &Config,
        id: QueueId,
        indices: &[usize],
        now: Instant,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(e) = self.messages.get_mut(&id) else {
            return;
        };
        // Never one that is done meanwhile (an operator bounced it).
        let recipients = &e.envelope.recipients;
        let indices: Vec<usize> = (indices.iter().copied())
            .filter(|i| {
                recipients
                    .get(*i)
                    .is_some_and(|r| r.state != RcptState::Done)
            })
            .collect();
        let unroutable = route_jobs(cfg, &e.envelope, &indices, out);
        e.inflight
            .extend(indices.iter().filter(|i| !unroutable.contains(i)));
        self.fail_unroutable(cfg, id, unroutable, now, now_ms, out);
    }

    fn fail_unroutable(
        &mut self,
        cfg: &Config,
        id: QueueId,
        unroutable: Vec<usize>,
        now: Instant,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        if unroutable.is_empty() {
            return;
        }
        let results = unroutable
            .into_iter()
            .map(|index| RcptResult {
                index,
                outcome: Outcome::Failed,
                reply: "550 5.4.4 No route to the recipient's domain".into(),
            })
            .collect();
        let result = JobResult {
            id,
            route: usize::MAX,
            next_hop: String::new(),
            results,
        };
        self.result(cfg, result, now, now_ms, out);
    }

    /// Record a job's outcome at `now` (monotonic) / `now_ms` (wall clock).
    pub fn result(
        &mut self,
        cfg: &Config,
        result: JobResult,
        now: Instant,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(entry) = self.messages.get_mut(&result.id) else {
            return;
        };
        for r in &result.results {
            entry.inflight.remove(&r.index);
        }
        let Entry {
            envelope: env,
            held,
            last,
            retries: scheduled,
            bouncing,
            ..
        } = entry;
        let (held, bouncing) = (*held, *bouncing);
        let mut changes = Vec::new();
        let mut bounce = Vec::new();
        let mut retry = Vec::new();
        let lifetime = cfg.delivery.max_queue_lifetime.as_millis() as u64;
        for r in &result.results {
            let returned;
            let r = match (bouncing, r.outcome) {
                (true, Outcome::Deferred) => {
                    returned = RcptResult {
                        outcome: Outcome::Failed,
                        reply: format!("{RETURNED} (last attempt: {})", r.reply),
                        ..r.clone()
                    };
                    &returned
                }
                _ => r,
            };
            let Some(rcpt) = env.recipients.get_mut(r.index) else {
                continue;
            };
            let attempts = match rcpt.state {
                RcptState::Pending { attempts } => attempts + 1,
                RcptState::Done => continue,
            };
            let hop = Some(result.next_hop.as_str());
            let reply = Some(r.reply.as_str());
            if r.outcome != Outcome::Delivered {
                *last = Some((result.next_hop.clone(), r.reply.clone(), now_ms));
            }
            let (kind, state) = match r.outcome {
                Outcome::Delivered => (MessageEvent::Delivered, RcptState::Done),
                Outcome::Failed => {
                    bounce.push(failure(&rcpt.address, r, &result.next_hop, false));
                    (MessageEvent::Bounced, RcptState::Done)
                }
                Outcome::Deferred => {
                    let delay = retry_delay(&cfg.delivery.retry, attempts);
                    let due_ms = now_ms.saturating_add(delay.as_millis() as u64);
                    if due_ms >= env.arrived_ms.saturating_add(lifetime) {
                        bounce.push(failure(&rcpt.address, r, &result.next_hop, true));
                        (MessageEvent::Expired, RcptState::Done)
                    } else {
                        // A held message waits for its release instead.
                        if !held {
                            retry.push((
                                (now + delay, due_ms),
                                JobRcpt {
                                    index: r.index,
                                    address: rcpt.address.clone(),
                                },
                            ));
                        }
                        (MessageEvent::Deferred, RcptState::Pending { attempts })
                    }
                }
            };
            events::message(kind, env.id, &env.sender, &rcpt.address, hop, reply);
            *match kind {
                MessageEvent::Delivered => &mut self.stats.delivered,
                MessageEvent::Bounced => &mut self.stats.bounced,
                MessageEvent::Expired => &mut self.stats.expired,
                _ => &mut self.stats.deferred,
            } += 1;
            rcpt.state = state.clone();
            changes.push((r.index, state));
        }
        // Recipients deferred together are retried together, as one job.
        let mut groups: BTreeMap<(Instant, u64), Vec<JobRcpt>> = BTreeMap::new();
        for (due, rcpt) in retry {
            groups.entry(due).or_default().push(rcpt);
        }
        for ((due, due_ms), recipients) in groups {
            self.seq += 1;
            let job = Job {
                id: env.id,
                sender: env.sender.clone(),
                recipients,
                expires_ms: env.arrived_ms.saturating_add(lifetime),
            };
            self.retries.insert((due, self.seq), (result.route, job));
            scheduled.push(((due, self.seq), due_ms));
        }
        if changes.is_empty() {
            return;
        }
        let finished = env.is_finished();
        out.push(Action::Settle {
            envelope: env.clone(),
            changes,
            bounce,
            finished,
        });
        if finished {
            self.remove(result.id);
        }
    }

    /// Dispatch every retry due at `now`. Recipients are routed afresh,
    /// so a route change (reload) applies to mail already queued.
    pub fn due(&mut self, cfg: &Config, now: Instant, now_ms: u64, out: &mut Vec<Action>) {
        while let Some(entry) = self.retries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = *entry.key();
            let (_, job) = entry.remove();
            let Some(e) = self.messages.get_mut(&job.id) else {
                continue;
            };
            e.retries.retain(|(k, _)| *k != key);
            let indices: Vec<usize> = job.recipients.iter().map(|r| r.index).collect();
            self.send(cfg, job.id, &indices, now, now_ms, out);
        }
    }
}

/// Group the recipients at `indices` by route and dispatch one job per
/// route; returns the indices no route serves.
fn route_jobs(
    cfg: &Config,
    env: &Envelope,
    indices: &[usize],
    out: &mut Vec<Action>,
) -> Vec<usize> {
    let mut by_route: BTreeMap<usize, Vec<JobRcpt>> = BTreeMap::new();
    let mut unroutable = Vec::new();
    for &index in indices {
        let address = &env.recipients[index].address;
        let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
        match cfg.route_for(domain) {
            Some(route) => by_route.entry(route).or_default().push(JobRcpt {
                index,
                address: address.clone(),
            }),
            None => unroutable.push(index),
        }
    }
    for (route, recipients) in by_route {
        let list: Vec<&str> = recipients.iter().map(|r| r.address.as_str()).collect();
        let hop = route_name(cfg, route);
        events::message(
            MessageEvent::Queued,
            env.id,
            &env.sender,
            &list.join(","),
            Some(&hop),
            None,
        );
        out.push(Action::Dispatch {
            route,
            target: cfg.routes[route].clone(),
            job: Job {
                id: env.id,
                sender: env.sender.clone(),
                recipients,
                expires_ms: env
                    .arrived_ms
                    .saturating_add(cfg.delivery.max_queue_lifetime.as_millis() as u64),
            },
        });
    }
    unroutable
}

fn failure(address: &str, r: &RcptResult, hop: &str, expired: bool) -> Failure {
    Failure {
        address: address.to_string(),
        reply: r.reply.clone(),
        next_hop: hop.to_string(),
        expired,
    }
}

/// A short name for a route in logs: its first next hop or drop directory.
pub fn route_name(cfg: &Config, route: usize) -> String {
    use crate::config::RouteTarget;
    match cfg.routes.get(route).map(|r| &r.target) {
        Some(RouteTarget::Smtp(hops)) => hops.first().map(|h| h.to_string()).unwrap_or_default(),
        Some(RouteTarget::DropDir(dir)) => dir.display().to_string(),
        Some(RouteTarget::Mx { .. }) => "MX".to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
pub(super) mod tests;
