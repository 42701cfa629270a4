//! `mtad ctl`: a small HTTP client for the admin API and the tables it
//! prints. Every request has a deadline, so ctl never hangs either.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{GroupRow, NodeRow, Problem, Status};

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
    let (method, path) = match cmd {
        Command::Status => ("GET", "/v1/status".to_string()),
        Command::Nodes => ("GET", "/v1/nodes".to_string()),
        Command::Evict(name) => ("POST", format!("/v1/nodes/{name}/evict")),
        Command::Groups => ("GET", "/v1/groups".to_string()),
        Command::Move(group, node) => ("POST", format!("/v1/groups/{group}/move/{node}")),
    };
    let (code, body) = request(base, method, &path).await?;
    if !(200..300).contains(&code) {
        let why = serde_json::from_str::<Problem>(&body).map_or(body, |p| p.error);
        return Err(format!("{base} answered {code}: {why}"));
    }
    let parse_err = |e: serde_json::Error| format!("unexpected answer from {base}: {e}");
    let status = match cmd {
        Command::Status => Some(serde_json::from_str::<Status>(&body).map_err(parse_err)?),
        _ => None,
    };
    let warning = status
        .as_ref()
        .and_then(|s| s.cluster_problem.clone())
        .map(|p| format!("{base}: not in its cluster: {p}"));
    if json {
        return Ok(Output {
            text: body,
            warning,
        });
    }
    let text = match (cmd, status) {
        (_, Some(s)) => {
            format!(
                "node {}  mtad {}  up {}s\ncluster: {}{}{}\ngroups owned: {}\nqueue: {} queued, {} delivered, {} deferred, {} bounced, {} expired\n",
                s.node,
                s.version,
                s.uptime_s,
                s.cluster_role,
                s.leader.map(|l| format!(" (leader {l})")).unwrap_or_default(),
                s.cluster_problem.map(|p| format!(" — not joined: {p}")).unwrap_or_default(),
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
        (Command::Status, None) => unreachable!("a status answer is parsed above"),
    };
    Ok(Output { text, warning })
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
        "{:<16} {:<8} {:<9} {:<8} {:<6} {:<22} {}\n",
        "NAME", "ROLE", "VOTE", "STATE", "LEADS", "ADDRESS", "INCARNATION"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<16} {:<8} {:<9} {:<8} {:<6} {:<22} {}\n",
            r.name,
            r.role,
            r.vote,
            r.state,
            if r.leader { "*" } else { "" },
            r.addr,
            r.incarnation
        ));
    }
    out
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
async fn request(base: &str, method: &str, path: &str) -> Result<(u16, String), String> {
    let host = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("admin URL must start with http://, got {base}"))?
        .trim_end_matches('/');
    let exchange = async {
        let mut s = TcpStream::connect(host)
            .await
            .map_err(|e| format!("cannot reach the admin API at {base}: {e}"))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
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
    Ok((code, body.to_string()))
}
