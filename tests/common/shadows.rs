//! A cluster of real processes for the shadow-copy tests: each node's
//! config, one message sent, and the copies a node keeps read off its disk.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mtad::spool::{DiskSpool, Spool};

use super::client::Client;
use super::daemon::{all_delivering, free_port, nodes_until, Daemon};

/// Three members node-a (which bootstraps), node-b and node-c.
pub struct Three {
    /// Their addresses, in that order.
    pub addrs: Vec<Addrs>,
    /// Their config files.
    pub configs: Vec<PathBuf>,
    /// The running daemons.
    pub nodes: Vec<Daemon>,
}

/// Start three members under `dir` (the cluster key written there), mail
/// for dest.example to `hop`, `spool` their `[spool]` keys; returns once
/// all three deliver (copies are refused before).
pub async fn three(dir: &Path, hop: SocketAddr, spool: &str) -> Three {
    std::fs::write(dir.join("cluster.key"), "shadow test secret, long enough").unwrap();
    let addrs: Vec<Addrs> = (0..3).map(|_| Addrs::new()).collect();
    let mut configs = Vec::new();
    let mut nodes = Vec::new();
    for (i, name) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        let seeds = [addrs[0].cluster];
        let seeds = if i == 0 { &[][..] } else { &seeds[..] };
        let cfg = write_config(dir, name, addrs[i], seeds, hop, spool);
        nodes.push(Daemon::start(&cfg).await);
        configs.push(cfg);
    }
    nodes_until(addrs[0].admin, |rows| all_delivering(rows, 3)).await;
    Three {
        addrs,
        configs,
        nodes,
    }
}
/// One node's addresses.
#[derive(Clone, Copy)]
pub struct Addrs {
    pub smtp: SocketAddr,
    pub cluster: SocketAddr,
    pub admin: SocketAddr,
}

impl Addrs {
    pub fn new() -> Addrs {
        Addrs {
            smtp: free_port(),
            cluster: free_port(),
            admin: free_port(),
        }
    }
}

/// Node `name`'s config: mail for dest.example to `hop`, retried every
/// second; `spool` is its `[spool]` table's keys.
pub fn write_config(
    dir: &Path,
    name: &str,
    at: Addrs,
    seeds: &[SocketAddr],
    hop: SocketAddr,
    spool: &str,
) -> PathBuf {
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!(
        r#"
[node]
name = "{name}"
data_dir = "{data}"

[smtp]
listen = ["{smtp}"]
hostname = "{name}.example.test"
relay_networks = ["127.0.0.0/8"]

[delivery]
retry = ["1s"]

[[route]]
domains = ["dest.example"]
next_hops = ["{hop}"]

[[route]]
domains = ["*"]
drop_dir = "{data}/outbox"

[spool]
{spool}

[cluster]
name = "shadows"
listen = "{cluster}"
seeds = [{seeds}]
secret_file = "{key}"
heartbeat_interval = "50ms"
election_timeout = "300ms"
join_backoff_min = "20ms"
join_backoff_max = "300ms"

[admin]
listen = "{admin}"

[log]
format = "json"
level = "info"
"#,
        data = data_dir(dir, name).display(),
        smtp = at.smtp,
        cluster = at.cluster,
        admin = at.admin,
        seeds = seeds.join(", "),
        key = dir.join("cluster.key").display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

pub fn data_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Send one message to `to` through `smtp`; the final reply.
pub async fn send(smtp: SocketAddr, subject: &str) -> String {
    let mut c = Client::connect(smtp).await.unwrap();
    let body = format!("Subject: {subject}\r\n\r\nshadowed {subject}");
    c.send("a@example.test", &["b@dest.example"], &body)
        .await
        .unwrap()
}

/// The queue id in "250 2.0.0 Ok: queued as ID".
pub fn queue_id(reply: &str) -> u64 {
    assert!(reply.starts_with("250"), "{reply}");
    let hex = reply.trim().rsplit(' ').next().unwrap();
    u64::from_str_radix(hex, 16).unwrap()
}

/// The ids of the shadows node `name` keeps, for any primary: read from a
/// copy of its shadow spools (opening them in place would write to them
/// under the running daemon).
pub fn shadows(dir: &Path, name: &str) -> BTreeSet<u64> {
    let root = data_dir(dir, name).join("shadows");
    let mut ids = BTreeSet::new();
    let Ok(primaries) = std::fs::read_dir(&root) else {
        return ids;
    };
    for p in primaries {
        let p = p.unwrap().path();
        // Markers and shelves detached for a takeover sit beside the
        // primaries' directories, named with a dot.
        if !p.is_dir() || p.extension().is_some() {
            continue;
        }
        let copy = tempfile::tempdir().unwrap();
        for seg in std::fs::read_dir(&p).unwrap() {
            let seg = seg.unwrap().path();
            // A segment deleted meanwhile held nothing live.
            let _ = std::fs::copy(&seg, copy.path().join(seg.file_name().unwrap()));
        }
        let spool = DiskSpool::open(copy.path()).unwrap();
        ids.extend(spool.recovered().iter().map(|r| r.envelope.id.0));
    }
    ids
}
