//! `mtad demo`: a three-node cluster on loopback addresses, in child
//! processes of this one, with a built-in sink. Mail streams to the group's
//! VIP; midway the VIP's owner is killed with SIGKILL and restarted; the
//! report says who owned the VIP, how long the failover took as a client
//! saw it, and whether every acknowledged message was delivered.
//!
//! With `wipe`, the sink defers all mail until the kill, so the owner
//! holds everything it acknowledged; its data directory is deleted before
//! it restarts (a new incarnation), and what it held reaches the sink
//! only through the shadow copies on the other two.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const NODES: [(&str, u8); 3] = [("node-a", 21), ("node-b", 22), ("node-c", 23)];
const VIP: [u8; 4] = [127, 0, 0, 120];
const SMTP_PORT: u16 = 2525;
const SINK: ([u8; 4], u16) = ([127, 0, 0, 30], 2526);
/// Bounds every wait, so a broken demo ends with an error, never hangs.
const PATIENCE: Duration = Duration::from_secs(60);

/// What the demo saw.
#[derive(Debug)]
pub struct Report {
    /// Where the logs and configs are.
    pub dir: PathBuf,
    /// The VIP's owner at the start.
    pub first_owner: String,
    /// The owner after the kill.
    pub next_owner: String,
    /// From SIGKILL to the first 220 from another node on the VIP.
    pub failover: Duration,
    /// Messages sent, acknowledged with 250, and delivered to the sink.
    pub sent: u64,
    /// Acknowledged.
    pub acknowledged: u64,
    /// Acknowledged and delivered.
    pub delivered: u64,
    /// Deliveries beyond the first of a message.
    pub duplicates: u64,
    /// With `wipe`: from SIGKILL to the first message the killed owner
    /// held reaching the sink through another node.
    pub promoted_after: Option<Duration>,
    /// The owner's data directory was deleted before its restart.
    pub wiped: bool,
}

impl Report {
    /// Every acknowledged message reached the sink.
    pub fn nothing_lost(&self) -> bool {
        self.delivered == self.acknowledged
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vip = SocketAddr::from((VIP, SMTP_PORT));
        writeln!(
            f,
            "three nodes on 127.0.0.21-23, VIP {vip}, sink {}",
            SocketAddr::from(SINK)
        )?;
        writeln!(f, "the VIP was on {} at the start", self.first_owner)?;
        let (killed, restarted) = match self.wiped {
            true => (
                " with all it acknowledged still queued, its data directory deleted",
                " on an empty data directory",
            ),
            false => ("", ""),
        };
        writeln!(
            f,
            "{} was killed (SIGKILL){killed}; {} greeted on the VIP {} ms later",
            self.first_owner,
            self.next_owner,
            self.failover.as_millis()
        )?;
        if let Some(after) = self.promoted_after {
            writeln!(
                f,
                "the first message it held reached the sink from a shadow copy {} ms after the kill",
                after.as_millis()
            )?;
        }
        writeln!(
            f,
            "{} was restarted{restarted} and rejoined",
            self.first_owner
        )?;
        writeln!(
            f,
            "messages: {} sent, {} acknowledged, {} of those delivered, {} twice{}",
            self.sent,
            self.acknowledged,
            self.delivered,
            self.duplicates,
            if self.nothing_lost() {
                " — none lost"
            } else {
                " — SOME LOST"
            }
        )?;
        match self.dir.as_os_str().is_empty() {
            true => write!(
                f,
                "configs and logs: removed (run with --keep to keep them)"
            ),
            false => write!(f, "configs and logs: {}", self.dir.display()),
        }
    }
}

impl Report {
    /// Remove the nodes' configurations and logs.
    pub fn remove_files(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("mtad demo: cannot remove {}: {e}", self.dir.display());
            return;
        }
        self.dir = PathBuf::new();
    }
}

/// Run the demo with `messages` messages, starting nodes with `exe`;
/// `wipe`: see the module's doc.
pub async fn run(exe: &Path, messages: u64, wipe: bool) -> Result<Report, String> {
    let dir = std::env::temp_dir().join(format!("mtad-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = dir.join("cluster.key");
    std::fs::write(&key, "the demo cluster's secret, long enough").map_err(|e| e.to_string())?;
    let sink = Sink {
        delivered: Arc::default(),
        open: Arc::new(AtomicBool::new(!wipe)),
    };
    let listener = TcpListener::bind(SocketAddr::from(SINK))
        .await
        .map_err(|e| format!("sink on {}: {e}", SocketAddr::from(SINK)))?;
    tokio::spawn(serve_sink(listener, sink.clone()));
    let configs: Vec<PathBuf> = NODES
        .iter()
        .map(|(name, last)| write_config(&dir, name, *last, &key))
        .collect::<Result<_, _>>()?;
    let mut nodes = Vec::new();
    for ((name, _), cfg) in NODES.iter().zip(&configs) {
        nodes.push(start(exe, &dir, name, cfg)?);
    }
    let result = drive(exe, (&dir, &configs), &mut nodes, (messages, wipe), &sink).await;
    for n in &mut nodes {
        let _ = n.start_kill();
        let _ = n.wait().await;
    }
    let mut report = result?;
    report.dir = dir;
    Ok(report)
}

async fn drive(
    exe: &Path,
    (dir, configs): (&Path, &[PathBuf]),
    nodes: &mut [Child],
    (messages, wipe): (u64, bool),
    sink: &Sink,
) -> Result<Report, String> {
    let vip = SocketAddr::from((VIP, SMTP_PORT));
    let first_owner = greeted_by_other(vip, None).await?;
    if wipe {
        // Mail taken while the owner is alone has no copy elsewhere (it
        // is under-replicated until the others join): start with three.
        settled(&first_owner).await?;
    }
    let mut acked = BTreeSet::new();
    let mut sent = 0;
    let (mut failover, mut next_owner) = (Duration::ZERO, String::new());
    let mut killed = None;
    let mut rejoined = Vec::new();
    while sent < messages {
        if sent == messages / 2 {
            // Midway: kill the owner, time the failover, restart it — once
            // all three vote (a cluster still growing from its first voter
            // cannot elect without it) and the owner has handed leading on
            // (it does so within seconds; killing an owner that still leads
            // would time an election as well as the failover).
            let name = first_owner.as_str();
            settled(name).await?;
            let i = NODES
                .iter()
                .position(|(n, _)| *n == name)
                .ok_or_else(|| format!("unknown owner {first_owner}"))?;
            let t0 = Instant::now();
            killed = Some((t0, sent));
            nodes[i].start_kill().map_err(|e| e.to_string())?;
            let _ = nodes[i].wait().await;
            if wipe {
                let data = dir.join(name);
                std::fs::remove_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
                sink.open.store(true, Ordering::SeqCst);
            }
            next_owner = greeted_by_other(vip, Some(name)).await?;
            failover = t0.elapsed();
            nodes[i] = start(exe, dir, name, &configs[i])?;
            rejoined.push((name.to_string(), dir.join(format!("{name}.log"))));
        }
        if send(vip, sent).await {
            acked.insert(sent);
        }
        sent += 1;
    }
    // Every acknowledged message should arrive; wait for them, bounded.
    let deadline = Instant::now() + PATIENCE;
    let arrived = loop {
        let arrived = sink
            .delivered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if acked.iter().all(|n| arrived.contains_key(n)) || Instant::now() > deadline {
            break arrived;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The restarted node is back in the cluster: its log (appended to by
    // both of its runs) says "joined the cluster" twice.
    for (name, log) in rejoined {
        let joined = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.matches("joined the cluster").count() >= 2
        };
        while !joined() {
            if Instant::now() > deadline {
                return Err(format!("{name} did not rejoin; see {}", log.display()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(Report {
        dir: PathBuf::new(),
        first_owner,
        next_owner,
        failover,
        sent,
        acknowledged: acked.len() as u64,
        delivered: acked.iter().filter(|n| arrived.contains_key(n)).count() as u64,
        duplicates: arrived.values().map(|(c, _)| c - 1).sum(),
        // Before the kill the sink took nothing: every one was held.
        promoted_after: killed.filter(|_| wipe).and_then(|(t0, held)| {
            let first = arrived.range(..held).map(|(_, (_, at))| *at).min()?;
            Some(first.saturating_duration_since(t0))
        }),
        wiped: wipe,
    })
}

/// Until node-b's admin API shows all three nodes up and voting, and
/// `owner` not leading (given up to 5 s more).
async fn settled(owner: &str) -> Result<(), String> {
    use crate::admin::client::{self, Command};
    let deadline = Instant::now() + PATIENCE;
    let mut voting_since = None;
    loop {
        let out = client::run("http://127.0.0.22:8025", &Command::Nodes, true).await;
        let rows: Vec<serde_json::Value> = out
            .ok()
            .and_then(|o| serde_json::from_str(&o.text).ok())
            .unwrap_or_default();
        let all = rows.len() == NODES.len()
            && rows
                .iter()
                .all(|r| r["state"] == "up" && r["vote"] == "voter");
        let owner_leads = rows
            .iter()
            .any(|r| r["leader"] == true && r["name"] == owner);
        if all {
            let since = *voting_since.get_or_insert_with(Instant::now);
            if !owner_leads || since.elapsed() > Duration::from_secs(5) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("the cluster did not settle: {rows:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_config(dir: &Path, name: &str, last: u8, key: &Path) -> Result<PathBuf, String> {
    let seeds: Vec<String> = NODES
        .iter()
        .map(|(_, l)| format!("\"127.0.0.{l}:7400\""))
        .collect();
    let vip = std::net::Ipv4Addr::from(VIP);
    let sink = SocketAddr::from(SINK);
    let text = format!(
        r#"[node]
name = "{name}"
data_dir = "{data}"

[smtp]
hostname = "{name}.demo.test"
relay_networks = ["127.0.0.0/8"]

[delivery]
retry = ["1s"]

[[route]]
domains = ["*"]
next_hops = ["{sink}"]

[cluster]
name = "demo"
listen = "127.0.0.{last}:7400"
seeds = [{seeds}]
secret_file = "{key}"

[[group]]
name = "mta"
vip = "{vip}/32"
provider = "loopback"
smtp_port = {SMTP_PORT}
preferred_nodes = ["node-a", "node-b", "node-c"]

[admin]
listen = "127.0.0.{last}:8025"

[log]
format = "json"
level = "info"
"#,
        data = dir.join(name).display(),
        seeds = seeds.join(", "),
        key = key.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Start a node; its log goes to DIR/NAME.log.
fn start(exe: &Path, dir: &Path, name: &str, cfg: &Path) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .map_err(|e| e.to_string())?;
    Command::new(exe)
        .args(["run", "--config"])
        .arg(cfg)
        .stdout(Stdio::from(log))
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {name}: {e}"))
}

/// Poll `vip` until a node other than `not` greets with 220; its name.
/// A fresh attempt every 5 ms alongside those in flight (a connect sent
/// while nobody holds the VIP may wait long), bounded by PATIENCE.
pub async fn greeted_by_other(vip: SocketAddr, not: Option<&str>) -> Result<String, String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (tx, not) = (tx.clone(), not.map(str::to_string));
        tokio::spawn(async move {
            // "node-b.demo.test": the node's name comes first.
            let who = greeter(vip, Duration::from_secs(3)).await;
            if let Some(name) = who.and_then(|w| Some(w.split('.').next()?.to_string())) {
                if not.is_none_or(|n| name != n) {
                    let _ = tx.send(name);
                }
            }
        });
        tokio::select! {
            Some(who) = rx.recv() => return Ok(who),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!("no node greeted on {vip} in time"));
            }
        }
    }
}

/// Who greets on `addr` now: the host name in its `220` line (None: no
/// connection, no greeting, or another code within `within`).
pub async fn greeter(addr: SocketAddr, within: Duration) -> Option<String> {
    let attempt = async {
        let mut r = BufReader::new(TcpStream::connect(addr).await.ok()?);
        let mut line = String::new();
        r.read_line(&mut line).await.ok()?;
        let _ = r.get_mut().write_all(b"QUIT\r\n").await;
        line.starts_with("220")
            .then(|| line.split_whitespace().nth(1).unwrap_or("").to_string())
    };
    tokio::time::timeout(within, attempt).await.ok().flatten()
}

/// Send message `n`; true when the server said 250 to its content.
async fn send(addr: SocketAddr, n: u64) -> bool {
    let attempt = async {
        let (r, mut w) = TcpStream::connect(addr).await.ok()?.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        let mut expect = async |w: &mut tokio::net::tcp::OwnedWriteHalf, send: &str, code: &str| {
            if !send.is_empty() {
                w.write_all(send.as_bytes()).await.ok()?;
            }
            loop {
                line.clear();
                r.read_line(&mut line).await.ok()?;
                if line.len() < 4 || line.as_bytes()[3] != b'-' {
                    return line.starts_with(code).then_some(());
                }
            }
        };
        expect(&mut w, "", "220").await?;
        expect(&mut w, "EHLO demo.test\r\n", "250").await?;
        expect(&mut w, "MAIL FROM:<demo@demo.test>\r\n", "250").await?;
        expect(&mut w, "RCPT TO:<someone@dest.test>\r\n", "250").await?;
        expect(&mut w, "DATA\r\n", "354").await?;
        let body = format!("Subject: demo-{n}\r\n\r\nmessage {n}\r\n.\r\n");
        expect(&mut w, &body, "250").await?;
        let _ = w.write_all(b"QUIT\r\n").await;
        Some(())
    };
    let done = tokio::time::timeout(Duration::from_secs(10), attempt).await;
    if !matches!(done, Ok(Some(()))) {
        // Nobody serves the VIP right now: try the next one shortly.
        tokio::time::sleep(Duration::from_millis(20)).await;
        return false;
    }
    true
}

/// The built-in sink's state.
#[derive(Clone)]
struct Sink {
    /// How often each "demo-N" arrived, and when first.
    delivered: Arc<Mutex<BTreeMap<u64, (u64, Instant)>>>,
    /// Whether it takes mail (else every MAIL gets 451).
    open: Arc<AtomicBool>,
}

/// A minimal SMTP sink: accepts everything while open, counts each
/// "demo-N".
async fn serve_sink(listener: TcpListener, sink: Sink) {
    while let Ok((stream, _)) = listener.accept().await {
        let sink = sink.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            if w.write_all(b"220 sink\r\n").await.is_err() {
                return;
            }
            let (mut line, mut data) = (String::new(), false);
            loop {
                line.clear();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let reply: &[u8] = if data {
                    if let Some(n) = line.strip_prefix("Subject: demo-") {
                        if let Ok(n) = n.trim().parse() {
                            let mut got = sink.delivered.lock().unwrap_or_else(|e| e.into_inner());
                            got.entry(n).or_insert((0, Instant::now())).0 += 1;
                        }
                    }
                    if line != ".\r\n" {
                        continue;
                    }
                    data = false;
                    b"250 ok\r\n"
                } else if line.to_ascii_uppercase().starts_with("MAIL")
                    && !sink.open.load(Ordering::SeqCst)
                {
                    b"451 4.3.0 the demo sink defers until the kill\r\n"
                } else if line.to_ascii_uppercase().starts_with("DATA") {
                    data = true;
                    b"354 go\r\n"
                } else if line.to_ascii_uppercase().starts_with("QUIT") {
                    let _ = w.write_all(b"221 bye\r\n").await;
                    return;
                } else {
                    b"250 ok\r\n"
                };
                if w.write_all(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}
