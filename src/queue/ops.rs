//! What operators see of the queue and do to it (`mtad ctl queue …`):
//! pure functions of the core's state, answered by the queue driver
//! between two events, so a listing never waits on delivery or disk.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::core::{route_name, Action, Core, Entry, RETURNED};
use crate::config::Config;
use crate::delivery::{JobResult, Outcome, RcptResult};
use crate::events::{self, MessageEvent};
use crate::spool::{QueueId, RcptState};

/// Longest page a listing returns.
pub const MAX_PAGE: usize = 1000;

/// Which messages: by destination (a route's name, such as its first next
/// hop, or a recipient domain) and by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
    /// "active" (being delivered), "deferred" (waiting for a retry) or
    /// "held".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// The states a [`Filter`] may name.
pub const STATES: [&str; 3] = ["active", "deferred", "held"];

/// One message in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRow {
    /// Queue id.
    pub id: String,
    /// When it was accepted (ms since the epoch).
    pub arrived_ms: u64,
    /// Reverse path ("" for the null sender).
    pub sender: String,
    /// Recipients not done yet.
    pub pending: usize,
    /// "active", "deferred" or "held".
    pub state: String,
    /// Most attempts made for one recipient.
    pub attempts: u32,
    /// When the next retry is due (ms since the epoch), if one is.
    pub next_attempt_ms: Option<u64>,
    /// The routes its pending recipients take.
    pub destinations: Vec<String>,
    /// The last reply that deferred or failed a recipient.
    pub last_reply: Option<String>,
}

/// A page of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Oldest first.
    pub messages: Vec<MessageRow>,
    /// Pass as `after` for the next page; None: this was the last.
    pub next: Option<String>,
}

/// One recipient of a shown message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptRow {
    /// Address.
    pub address: String,
    /// "pending", "in flight" or "done".
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
}

/// `queue show`: a message in full (headers are added by the caller,
/// which reads the spool).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDetail {
    /// As in a listing.
    pub message: MessageRow,
    /// Every recipient.
    pub recipients: Vec<RcptRow>,
    /// The next hop that gave the last reply.
    pub last_hop: Option<String>,
    /// When the last reply came (ms since the epoch).
    pub last_reply_ms: Option<u64>,
    /// The message's header section.
    #[serde(default)]
    pub headers: String,
    /// The other members holding a copy of it (names; filled in by the
    /// admin API in a cluster).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<String>,
}

/// One destination in `queue summary`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRow {
    /// The route's name (its first next hop or drop directory).
    pub name: String,
    /// Messages with a recipient for it.
    pub messages: usize,
    /// Recipients for it.
    pub recipients: usize,
    /// Of those, how many were deferred at least once.
    pub deferred: usize,
    /// Messages held.
    pub held: usize,
    /// When the oldest arrived (ms since the epoch).
    pub oldest_ms: u64,
    /// The latest reply that deferred or failed one of its messages.
    pub last_error: Option<String>,
    /// Associations open to it now (filled in by the caller, who knows
    /// the delivery side).
    #[serde(default)]
    pub associations: usize,
}

/// What to do to the selected messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Retry now what waits for a retry.
    Flush,
    /// Dispatch nothing until released.
    Hold,
    /// Undo a hold: dispatch at once.
    Release,
    /// Remove from the queue and the spool, with no notice to anyone.
    Delete,
    /// Fail every pending recipient: a DSN goes to the sender.
    Bounce,
}

/// The messages an action applies to: these ids, or every message the
/// filter matches (`all` must be set when the filter is empty, so a
/// missing argument never means "everything").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// Queue ids.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Or a filter.
    #[serde(default)]
    pub filter: Filter,
    /// Every message (with an empty filter).
    #[serde(default)]
    pub all: bool,
}

/// Parse a queue id as shown (hex).
pub fn parse_id(s: &str) -> Option<QueueId> {
    u64::from_str_radix(s.trim(), 16).ok().map(QueueId)
}

impl Core {
    fn state_of(e: &Entry) -> &'static str {
        if e.held {
            "held"
        } else if !e.inflight.is_empty() {
            "active"
        } else {
            "deferred"
        }
    }

    /// The route names of `e`'s pending recipients.
    fn destinations(cfg: &Config, e: &Entry) -> Vec<String> {
        let mut names: Vec<String> = pending(e)
            .filter_map(|(_, a, _)| cfg.route_for(domain(a)))
            .map(|r| route_name(cfg, r))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    fn row(cfg: &Config, e: &Entry) -> MessageRow {
        let env = &e.envelope;
        MessageRow {
            id: env.id.to_string(),
            arrived_ms: env.arrived_ms,
            sender: env.sender.clone(),
            pending: pending(e).count(),
            state: Self::state_of(e).into(),
            attempts: pending(e).map(|(_, _, n)| n).max().unwrap_or(0),
            next_attempt_ms: e.retries.iter().map(|(_, ms)| *ms).min(),
            destinations: Self::destinations(cfg, e),
            last_reply: e.last.as_ref().map(|(_, reply, _)| reply.clone()),
        }
    }

    /// Up to `limit` (at most [`MAX_PAGE`]) messages matching `f`, oldest
    /// first, after the id `after`.
    pub fn list(&self, cfg: &Config, f: &Filter, after: Option<QueueId>, limit: usize) -> Page {
        let limit = limit.clamp(1, MAX_PAGE);
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut matcher = Matcher::new(cfg, f);
        let mut rows = self
            .messages
            .range((from, Bound::Unbounded))
            .filter(|(_, e)| matcher.matches(e));
        let messages: Vec<MessageRow> = rows
            .by_ref()
            .take(limit)
            .map(|(_, e)| Self::row(cfg, e))
            .collect();
        let more = rows.next().is_some();
        Page {
            next: more
                .then(|| messages.last().map(|m| m.id.clone()))
                .flatten(),
            messages,
        }
    }

    /// One message in full, without its headers.
    pub fn show(&self, cfg: &Config, id: QueueId) -> Option<MessageDetail> {
        let e = self.messages.get(&id)?;
        let recipients = e
            .envelope
            .recipients
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (state, attempts) = match r.state {
                    RcptState::Done => ("done", 0),
                    RcptState::Pending { attempts } if e.inflight.contains(&i) => {
                        ("in flight", attempts)
                    }
                    RcptState::Pending { attempts } => ("pending", attempts),
                };
                RcptRow {
                    address: r.address.clone(),
                    state: state.into(),
                    attempts,
                }
            })
            .collect();
        Some(MessageDetail {
            message: Self::row(cfg, e),
            recipients,
            last_hop: e.last.as_ref().map(|(hop, _, _)| hop.clone()),
            last_reply_ms: e.last.as_ref().map(|(_, _, at)| *at),
            headers: String::new(),
            copies: Vec::new(),
        })
    }

    /// Per destination: what waits for it, like Postfix's qshape.
    pub fn summary(&self, cfg: &Config) -> Vec<DestinationRow> {
        // Per route: the row, and the latest error with its time. A
        // million recipients share a few domains: each is routed once.
        type Latest<'a> = Option<(u64, &'a str)>;
        let mut per_route: Vec<Option<(DestinationRow, Latest)>> = vec![None; cfg.routes.len()];
        let mut routes: HashMap<&str, Option<usize>> = HashMap::new();
        for e in self.messages.values() {
            let mut seen = Vec::new();
            for (_, address, attempts) in pending(e) {
                let d = domain(address);
                let route = *routes.entry(d).or_insert_with(|| cfg.route_for(d));
                let Some(r) = route.filter(|r| *r < per_route.len()) else {
                    continue;
                };
                let (row, latest) = per_route[r].get_or_insert_with(|| {
                    let row = DestinationRow {
                        name: route_name(cfg, r),
                        oldest_ms: u64::MAX,
                        ..DestinationRow::default()
                    };
                    (row, None)
                });
                row.recipients += 1;
                row.deferred += usize::from(attempts > 0);
                if seen.contains(&r) {
                    continue;
                }
                seen.push(r);
                row.messages += 1;
                row.held += usize::from(e.held);
                row.oldest_ms = row.oldest_ms.min(e.envelope.arrived_ms);
                if let Some((_, reply, at)) = &e.last {
                    if latest.is_none_or(|(t, _)| *at > t) {
                        *latest = Some((*at, reply.as_str()));
                    }
                }
            }
        }
        // Two routes to the same first hop are one destination.
        let mut rows: BTreeMap<String, DestinationRow> = BTreeMap::new();
        for (mut row, latest) in per_route.into_iter().flatten() {
            row.last_error = latest.map(|(_, reply)| reply.to_string());
            match rows.get_mut(&row.name) {
                Some(same) => {
                    same.messages += row.messages;
                    same.recipients += row.recipients;
                    same.deferred += row.deferred;
                    same.held += row.held;
                    same.oldest_ms = same.oldest_ms.min(row.oldest_ms);
                    same.last_error = same.last_error.take().or(row.last_error);
                }
                None => {
                    rows.insert(row.name.clone(), row);
                }
            }
        }
        rows.into_values().collect()
    }

    /// The messages `sel` names that are queued, or why it names none.
    pub fn select(&self, cfg: &Config, sel: &Selector) -> Result<Vec<QueueId>, String> {
        if !sel.ids.is_empty() {
            return sel
                .ids
                .iter()
                .map(|s| {
                    let id = parse_id(s).ok_or_else(|| format!("{s:?} is not a queue id"))?;
                    match self.messages.contains_key(&id) {
                        true => Ok(id),
                        false => Err(format!("no message {s} in the queue")),
                    }
                })
                .collect();
        }
        if sel.filter == Filter::default() && !sel.all {
            return Err("name messages by id, by a filter, or ask for all".into());
        }
        let mut matcher = Matcher::new(cfg, &sel.filter);
        Ok(self
            .messages
            .iter()
            .filter(|(_, e)| matcher.matches(e))
            .map(|(id, _)| *id)
            .collect())
    }

    /// Do `op` to `ids`; returns how many it changed.
    pub fn act(
        &mut self,
        cfg: &Config,
        op: Op,
        ids: &[QueueId],
        now: Instant,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) -> usize {
        let mut changed = 0;
        for id in ids {
            let Some(e) = self.messages.get_mut(id) else {
                continue;
            };
            let done = match op {
                Op::Flush if e.held || e.retries.is_empty() => false,
                Op::Flush => {
                    self.send_waiting(cfg, *id, now, now_ms, out);
                    true
                }
                Op::Hold if e.held => false,
                Op::Hold => {
                    e.held = true;
                    for (key, _) in e.retries.drain(..) {
                        self.retries.remove(&key);
                    }
                    log(MessageEvent::Held, e);
                    true
                }
                Op::Release if !e.held => false,
                Op::Release => {
                    e.held = false;
                    log(MessageEvent::Released, e);
                    self.send_waiting(cfg, *id, now, now_ms, out);
                    true
                }
                Op::Delete => {
                    log(MessageEvent::Deleted, e);
                    let Some(e) = self.remove(*id) else {
                        continue;
                    };
                    out.push(Action::Settle {
                        envelope: e.envelope,
                        changes: Vec::new(),
                        bounce: Vec::new(),
                        finished: true,
                    });
                    true
                }
                Op::Bounce => {
                    // Recipients in flight are left to their attempt: one
                    // it delivers is delivered, the others come back.
                    e.bouncing = true;
                    for (key, _) in e.retries.drain(..) {
                        self.retries.remove(&key);
                    }
                    let results: Vec<RcptResult> = pending(e)
                        .filter(|(index, _, _)| !e.inflight.contains(index))
                        .map(|(index, _, _)| RcptResult {
                            index,
                            outcome: Outcome::Failed,
                            reply: RETURNED.into(),
                        })
                        .collect();
                    let result = JobResult {
                        id: *id,
                        route: usize::MAX,
                        next_hop: "postmaster".into(),
                        results,
                    };
                    self.result(cfg, result, now, now_ms, out);
                    true
                }
            };
            changed += usize::from(done);
        }
        changed
    }
}

/// A [`Filter`] made ready to test many messages: the routes it names are
/// found once, and each recipient domain is routed once.
struct Matcher<'a> {
    cfg: &'a Config,
    state: Option<&'a str>,
    /// The destination as a domain (lowercase, no trailing dot).
    domain: Option<String>,
    /// The routes whose name is the destination.
    routes: Vec<usize>,
    routed: HashMap<String, bool>,
}

impl<'a> Matcher<'a> {
    fn new(cfg: &'a Config, f: &'a Filter) -> Matcher<'a> {
        let dest = f.dest.as_deref();
        let routes = (0..cfg.routes.len())
            .filter(|r| Some(route_name(cfg, *r).as_str()) == dest)
            .collect();
        Matcher {
            cfg,
            state: f.state.as_deref(),
            domain: dest.map(|d| d.trim_end_matches('.').to_ascii_lowercase()),
            routes,
            routed: HashMap::new(),
        }
    }

    fn matches(&mut self, e: &Entry) -> bool {
        if self.state.is_some_and(|s| s != Core::state_of(e)) {
            return false;
        }
        let Some(want) = &self.domain else {
            return true;
        };
        for (_, address, _) in pending(e) {
            let d = domain(address);
            if d.eq_ignore_ascii_case(want) {
                return true;
            }
            let by_route = match self.routed.get(d) {
                Some(hit) => *hit,
                None => {
                    let hit = self
                        .cfg
                        .route_for(d)
                        .is_some_and(|r| self.routes.contains(&r));
                    self.routed.insert(d.to_string(), hit);
                    hit
                }
            };
            if by_route {
                return true;
            }
        }
        false
    }
}

fn log(kind: MessageEvent, e: &Entry) {
    let rcpts: Vec<&str> = pending(e).map(|(_, a, _)| a).collect();
    let env = &e.envelope;
    let why = Some("by the postmaster");
    events::message(kind, env.id, &env.sender, &rcpts.join(","), None, why);
}

/// Pending recipients: index, address, attempts.
fn pending(e: &Entry) -> impl Iterator<Item = (usize, &str, u32)> {
    let rcpts = e.envelope.recipients.iter().enumerate();
    rcpts.filter_map(|(i, r)| match r.state {
        RcptState::Pending { attempts } => Some((i, r.address.as_str(), attempts)),
        RcptState::Done => None,
    })
}

fn domain(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
