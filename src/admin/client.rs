//! `mtad ctl`: a small HTTP client for the admin API and the tables it
//! prints. Every request has a deadline, so ctl never hangs either.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Acted, GroupRow, NodeRow, Problem, Status};
use crate::queue::ops::{DestinationRow, Filter, MessageDetail, MessageRow, Op, Page, Selector};

/// Deadline for one ctl request, connect to last byte.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// What ctl was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Node status.
    Status,
    /// Cluster members.
    Nodes,
    /// Remove a dead member.
    Evict(String),
    /// Resource groups.
    Groups,
    /// Move a group to a node: (group, node).
    Move(String, String),
    /// Re-read the node's configuration file.
    Reload,
    /// Drain a node (true) or end its drain (false).
    Drain(String, bool),
    /// Per-destination queue counts.
    QueueSummary,
    /// Queued messages matching the filter, oldest first, after an id,
    /// at most `limit` (fetched page by page).
    QueueList(Filter, Option<String>, usize),
    /// One message in full.
    QueueShow(String),
    /// An action on the selected messages.
    QueueAct(Op, Selector),
}

impl Command {
    /// For actions that cannot be undone: the question to ask first.
    pub fn confirmation(&self) -> Option<String> {
        let Command::QueueAct(op @ (Op::Delete | Op::Bounce), sel) = self else {
            return None;
        };
        let what = if !sel.ids.is_empty() {
            format!("{} message(s): {}", sel.ids.len(), sel.ids.join(" "))
        } else if sel.filter == Filter::default() {
            "EVERY queued message".to_string()
        } else {
            let mut f = Vec::new();
            f.extend(sel.filter.dest.as_ref().map(|d| format!("destination {d}")));
            f.extend(sel.filter.state.as_ref().map(|s| format!("state {s}")));
            format!("every message with {}", f.join(" and "))
        };
        let verb = match op {
            Op::Delete => "Delete (no notice to anyone)",
            _ => "Bounce (a DSN to each sender)",
        };
        Some(format!("{verb} {what}?"))
    }
}

/// A successful answer: what to print, and a warning when the node
/// answered but is not part of its cluster (ctl then exits 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// For stdout.
    pub text: String,
    /// For stderr.
    pub warning: Option<String>,
}

/// Run `cmd` against the admin API at `base` (e.g. `http://127.0.0.1:8025`);
/// Err is the message for stderr (exit 1).
pub async fn run(base: &str, cmd: &Command, json: bool) -> Result<Output, String> {
    run_with(&Api::new(base, None), cmd, json).await
}

/// An admin API: its base URL and the bearer token it wants, if any.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: Option<String>,
}

impl Api {
    /// The API at `base`, sending `token` with every request.
    pub fn new(base: &str, token: Option<String>) -> Api {
        Api {
            base: base.to_string(),
            token,
        }
    }
}

/// Like [`run`], with a token.
pub async fn run_with(api: &Api, cmd: &Command, json: bool) -> Result<Output, String> {
    let base = api.base.as_str();
    let parse_err = |e: serde_json::Error| format!("unexpected answer from {base}: {e}");
    if let Command::QueueList(f, after, limit) = cmd {
        let page = list(api, f, after.clone(), *limit).await?;
        let text = match json {
            true => serde_json::to_string(&page).map_err(parse_err)? + "\n",
            false => message_table(&page),
        };
        return Ok(Output {
            text,
            warning: None,
        });
    }
    let (method, path, payload) = match cmd {
        Command::Status => ("GET", "/v1/status".to_string(), None),
        Command::Nodes => ("GET", "/v1/nodes".to_string(), None),
        Command::Evict(name) => ("POST", format!("/v1/nodes/{name}/evict"), None),
        Command::Groups => ("GET", "/v1/groups".to_string(), None),
        Command::Move(group, node) => ("POST", format!("/v1/groups/{group}/move/{node}"), None),
        Command::Reload => ("POST", "/v1/reload".to_string(), None),
        Command::Drain(name, true) => ("POST", format!("/v1/nodes/{name}/drain"), None),
        Command::Drain(name, false) => ("POST", format!("/v1/nodes/{name}/undrain"), None),
        Command::QueueSummary => ("GET", "/v1/queue/summary".to_string(), None),
        Command::QueueShow(id) => ("GET", format!("/v1/queue/{}", encode(id)), None),
        Command::QueueAct(op, sel) => {
            let body = serde_json::to_string(sel).map_err(|e| e.to_string())?;
            ("POST", format!("/v1/queue/{}", op_name(*op)), Some(body))
        }
        Command::QueueList(..) => unreachable!("listed above"),
    };
    let (body, no_quorum) = call(api, method, &path, payload).await?;
    let status = match cmd {
        Command::Status => Some(serde_json::from_str::<Status>(&body).map_err(parse_err)?),
        _ => None,
    };
    let warning = status
        .as_ref()
        .and_then(|s| s.cluster_problem.clone())
        .map(|p| format!("{base}: not in its cluster: {p}"))
        .or_else(|| {
            no_quorum
                .then(|| format!("{base} sees no working majority: this is its last known state"))
        });
    if json {
        return Ok(Output {
            text: body,
            warning,
        });
    }
    let text = match (cmd, status) {
        (_, Some(s)) => {
            format!(
                "node {}  mtad {}  up {}s\ncluster: {}{}{}{}{}{}\ngroups owned: {}\nqueue: {} queued, {} delivered, {} deferred, {} bounced, {} expired\n",
                s.node,
                s.version,
                s.uptime_s,
                s.cluster_role,
                s.leader.map(|l| format!(" (leader {l})")).unwrap_or_default(),
                s.cluster_problem.map(|p| format!(" — not joined: {p}")).unwrap_or_default(),
                secrets_line(&s.secrets),
                s.drain.map(|d| format!("\nmail: {d} (ctl drain --cancel ends it)")).unwrap_or_default(),
                s.underreplicated.map(|n| format!("\ncopies: {n} message(s) short of a copy on other members")).unwrap_or_default(),
                if s.groups.is_empty() { "none".to_string() } else { s.groups.join(", ") },
                s.queued,
                s.delivered,
                s.deferred,
                s.bounced,
                s.expired
            )
        }
        (Command::Nodes, _) => {
            let rows: Vec<NodeRow> = serde_json::from_str(&body).map_err(parse_err)?;
            table(&rows)
        }
        (Command::Evict(name), _) => format!("{name} evicted\n"),
        (Command::Groups, _) => {
            let rows: Vec<GroupRow> = serde_json::from_str(&body).map_err(parse_err)?;
            group_table(&rows)
        }
        (Command::Move(group, node), _) => {
            format!("{group} moving to {node}: it drains, stops and starts there\n")
        }
        (Command::Drain(name, true), _) => format!(
            "{name} draining: it takes no new mail and hands its groups and queue on; \
             `status` on it says \"drained\" when done\n"
        ),
        (Command::Drain(name, false), _) => format!("{name} no longer drained\n"),
        (Command::Reload, _) => {
            let o: crate::admin::ReloadOutcome = serde_json::from_str(&body).map_err(parse_err)?;
            let mut text = match o.changed.is_empty() {
                true => "reloaded: nothing changed\n".to_string(),
                false => format!("reloaded: {} changed\n", o.changed.join(", ")),
            };
            for w in &o.warnings {
                text.push_str(&format!("warning: {w}\n"));
            }
            text
        }
        (Command::QueueSummary, _) => {
            let rows: Vec<DestinationRow> = serde_json::from_str(&body).map_err(parse_err)?;
            // In a cluster, the copies' health under the table, as status
            // says it.
            let (status, _) = call(api, "GET", "/v1/status", None).await?;
            let status: Status = serde_json::from_str(&status).map_err(parse_err)?;
            let copies = status
                .underreplicated
                .map(|n| format!("copies: {n} message(s) short of a copy on other members\n"));
            summary_table(&rows) + &copies.unwrap_or_default()
        }
        (Command::QueueShow(_), _) => {
            let d: MessageDetail = serde_json::from_str(&body).map_err(parse_err)?;
            detail(&d)
        }
        (Command::QueueAct(..), _) => {
            let a: Acted = serde_json::from_str(&body).map_err(parse_err)?;
            format!("{}: {} message(s) changed\n", op_name(a.op), a.changed)
        }
        (Command::Status | Command::QueueList(..), None) => unreachable!("handled above"),
    };
    Ok(Output { text, warning })
}

/// One request; a non-2xx answer is an error with the API's reason.
/// Also says whether the node answered without a working majority.
async fn call(
    api: &Api,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(String, bool), String> {
    let base = api.base.as_str();
    let (code, no_quorum, body) = request(api, method, path, body).await?;
    if !(200..300).contains(&code) {
        let why = serde_json::from_str::<Problem>(&body).map_or(body, |p| p.error);
        return Err(format!("{base} answered {code}: {why}"));
    }
    Ok((body, no_quorum))
}

/// Up to `limit` rows, page by page (each page its own request, so a
/// million messages never travel in one answer).
async fn list(
    api: &Api,
    f: &Filter,
    mut after: Option<String>,
    limit: usize,
) -> Result<Page, String> {
    let base = api.base.as_str();
    let mut all = Page {
        messages: Vec::new(),
        next: None,
    };
    loop {
        let want = (limit - all.messages.len()).min(crate::queue::ops::MAX_PAGE);
        let mut q = vec![format!("limit={want}")];
        q.extend(f.dest.as_ref().map(|d| format!("dest={}", encode(d))));
        q.extend(f.state.as_ref().map(|s| format!("state={}", encode(s))));
        q.extend(after.as_ref().map(|a| format!("after={}", encode(a))));
        let (body, _) = call(api, "GET", &format!("/v1/queue?{}", q.join("&")), None).await?;
        let page: Page = serde_json::from_str(&body)
            .map_err(|e| format!("unexpected answer from {base}: {e}"))?;
        all.messages.extend(page.messages);
        all.next = page.next;
        if all.next.is_none() || all.messages.len() >= limit {
            return Ok(all);
        }
        after = all.next.clone();
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Flush => "flush",
        Op::Hold => "hold",
        Op::Release => "release",
        Op::Delete => "delete",
        Op::Bounce => "bounce",
    }
}

/// Percent-encode all but unreserved characters (RFC 3986).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn age(ms: u64) -> String {
    let now = crate::clock::now_ms();
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn message_table(page: &Page) -> String {
    let mut out = format!(
        "{:<16} {:<6} {:<8} {:<5} {:<30} {:<22} {}\n",
        "ID", "AGE", "STATE", "RCPTS", "SENDER", "DESTINATION", "LAST REPLY"
    );
    for m in &page.messages {
        out.push_str(&message_line(m));
    }
    if let Some(next) = &page.next {
        out.push_str(&format!("(more: --after {next})\n"));
    }
    out
}

fn message_line(m: &MessageRow) -> String {
    let sender = if m.sender.is_empty() { "<>" } else { &m.sender };
    format!(
        "{:<16} {:<6} {:<8} {:<5} {:<30} {:<22} {}\n",
        m.id,
        age(m.arrived_ms),
        m.state,
        m.pending,
        sender,
        m.destinations.join(","),
        m.last_reply.as_deref().unwrap_or("-")
    )
}

fn summary_table(rows: &[DestinationRow]) -> String {
    let mut out = format!(
        "{:<28} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6}  {}\n",
        "DESTINATION", "MESSAGES", "RCPTS", "DEFERRED", "HELD", "OLDEST", "ASSOCS", "LAST ERROR"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<28} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6}  {}\n",
            r.name,
            r.messages,
            r.recipients,
            r.deferred,
            r.held,
            age(r.oldest_ms),
            r.associations,
            r.last_error.as_deref().unwrap_or("-")
        ));
    }
    out
}

fn detail(d: &MessageDetail) -> String {
    let m = &d.message;
    let mut out = format!(
        "id: {}\nsender: <{}>\narrived: {} ago\nstate: {}\n",
        m.id,
        m.sender,
        age(m.arrived_ms),
        m.state
    );
    if let Some(at) = m.next_attempt_ms {
        let wait = at.saturating_sub(crate::clock::now_ms()) / 1000;
        out.push_str(&format!("next attempt: in {wait}s\n"));
    }
    if let Some(reply) = &m.last_reply {
        let hop = d.last_hop.as_deref().unwrap_or("-");
        out.push_str(&format!("last reply: {reply} (from {hop})\n"));
    }
    if !d.copies.is_empty() {
        out.push_str(&format!("copies on: {}\n", d.copies.join(", ")));
    }
    out.push_str("recipients:\n");
    for r in &d.recipients {
        out.push_str(&format!(
            "  {:<40} {:<10} {} attempt(s)\n",
            r.address, r.state, r.attempts
        ));
    }
    out.push_str("headers:\n");
    for line in d.headers.lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out
}

fn group_table(rows: &[GroupRow]) -> String {
    let mut out = format!(
        "{:<16} {:<16} {:<6} {:<9} {:<9} {}\n",
        "GROUP", "OWNER", "EPOCH", "STATUS", "PHASE", "LAST TRANSITION"
    );
    for r in rows {
        let mut last = r.reason.clone();
        if let Some(t) = &r.move_to {
            last.push_str(&format!(" (moving to {t})"));
        }
        if !r.fenced.is_empty() {
            last.push_str(&format!(" (fenced: {})", r.fenced.join(", ")));
        }
        out.push_str(&format!(
            "{:<16} {:<16} {:<6} {:<9} {:<9} {}\n",
            r.name,
            r.owner.as_deref().unwrap_or("-"),
            r.epoch,
            r.status,
            r.phase,
            last
        ));
    }
    out
}

fn table(rows: &[NodeRow]) -> String {
    let mut out = format!(
        "{:<16} {:<8} {:<9} {:<8} {:<6} {:<9} {:<22} {:<20} {:>8} {:>8}\n",
        "NAME",
        "ROLE",
        "VOTE",
        "STATE",
        "LEADS",
        "DELIVERS",
        "ADDRESS",
        "INCARNATION",
        "SHADOWS",
        "COPIES"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<16} {:<8} {:<9} {:<8} {:<6} {:<9} {:<22} {:<20} {:>8} {:>8}\n",
            r.name,
            r.role,
            r.vote,
            r.state,
            if r.leader { "*" } else { "" },
            if r.delivers { "yes" } else { "no" },
            r.addr,
            r.incarnation,
            r.shadows_here,
            r.copies_there
        ));
    }
    out
}

/// One HTTP/1.1 request with `Connection: close`; returns the status,
/// whether the node flagged its answer as its last known state, and the
/// body.
async fn request(
    api: &Api,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(u16, bool, String), String> {
    let base = api.base.as_str();
    let auth = match &api.token {
        Some(t) => format!("Authorization: Bearer {t}\r\n"),
        None => String::new(),
    };
    let host = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("admin URL must start with http://, got {base}"))?
        .trim_end_matches('/');
    let exchange = async {
        let mut s = TcpStream::connect(host)
            .await
            .map_err(|e| format!("cannot reach the admin API at {base}: {e}"))?;
        let body = body.unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(DEADLINE, exchange)
        .await
        .map_err(|_| format!("the admin API at {base} did not answer within {DEADLINE:?}"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed answer from {base}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("malformed status line from {base}"))?;
    let no_quorum = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with(&format!("{}:", super::NO_QUORUM))
    });
    Ok((code, no_quorum, body.to_string()))
}

/// "secret ab12cd34 (also accepting 9f00aa11)", on its own line.
fn secrets_line(fingerprints: &[String]) -> String {
    match fingerprints {
        [] => String::new(),
        [proving] => format!("\nsecret: {proving}"),
        [proving, accepted @ ..] => {
            format!(
                "\nsecret: {proving} (also accepting {})",
                accepted.join(", ")
            )
        }
    }
}
