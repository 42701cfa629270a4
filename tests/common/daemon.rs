//! A real `mtad` process for tests: started from a config file, its log
//! read line by line so tests can await what it says.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;

/// A port nothing listens on right now, for a daemon to bind later.
///
/// Taken below the kernel's ephemeral range (32768–60999), so the client
/// side of some other test's connection cannot take it between this check
/// and the daemon's bind; a per-process counter keeps parallel tests apart.
pub fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % 100) as u16 * 120;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + start.wrapping_add(n) % 12_000;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
}

/// A running `mtad run`.
pub struct Daemon {
    /// The process.
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Lines read while waiting for another: a later wait may want them
    /// (a message can be delivered before "mtad ready" is logged).
    earlier: Vec<String>,
}

/// Read the daemon's log continuously: a full pipe would block its logging.
/// With `MTAD_TEST_ECHO=DIR`, every line is also kept in DIR/PID.log.
fn drain(stdout: ChildStdout, pid: u32) -> mpsc::UnboundedReceiver<String> {
    use std::io::Write;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut echo = std::env::var_os("MTAD_TEST_ECHO").and_then(|dir| {
        let path = Path::new(&dir).join(format!("{pid}.log"));
        std::fs::File::create(path).ok()
    });
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(f) = echo.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Daemon {
    /// Start `mtad run` and wait for its "mtad ready" log line.
    pub async fn start(config: &Path) -> Daemon {
        Self::start_in(&[], config).await
    }

    /// Start `mtad run` under `prefix` (e.g. `ip netns exec NS`, which
    /// execs, so the child is mtad itself).
    pub async fn start_in(prefix: &[String], config: &Path) -> Daemon {
        Self::start_with(prefix, config, &[]).await
    }

    /// Start `mtad run` under `prefix` with extra environment variables.
    pub async fn start_with(prefix: &[String], config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut argv: Vec<String> = prefix.to_vec();
        argv.push(env!("CARGO_BIN_EXE_mtad").into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(env.iter().copied())
            .args(["run", "--config"])
            .arg(config);
        Self::spawn(cmd).await
    }

    /// Start `mtad run` without a configuration file, in `dir`.
    pub async fn start_default(dir: &Path) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mtad"));
        cmd.arg("run").current_dir(dir);
        Self::spawn(cmd).await
    }

    async fn spawn(mut cmd: Command) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap_or(0);
        let lines = drain(child.stdout.take().unwrap(), pid);
        let mut d = Daemon {
            child,
            lines,
            earlier: Vec::new(),
        };
        d.wait_line(|l| l.contains("mtad ready")).await;
        d
    }

    /// Send the daemon `signal` (e.g. `libc::SIGHUP`).
    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill only sends a signal to our own child.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// The first log line not yet returned that satisfies `want` — read
    /// now, or read earlier while waiting for another; panics if the log
    /// ends first.
    pub async fn wait_line(&mut self, mut want: impl FnMut(&str) -> bool) -> String {
        if let Some(i) = self.earlier.iter().position(|l| want(l)) {
            return self.earlier.remove(i);
        }
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                if want(&line) {
                    return line;
                }
                self.earlier.push(line);
            }
            panic!("mtad exited before the expected log line");
        };
        tokio::time::timeout(super::node::PATIENCE, wait)
            .await
            .expect("log line in time")
    }
}

/// Run `mtad ctl --admin http://ADDR ARGS…` and return its output.
pub async fn ctl_output(admin: SocketAddr, args: &[&str]) -> std::process::Output {
    let url = format!("http://{admin}");
    Command::new(env!("CARGO_BIN_EXE_mtad"))
        .args(["ctl", "--admin", &url])
        .args(args)
        .output()
        .await
        .unwrap()
}

/// Run `mtad ctl`; (success, stdout + stderr).
pub async fn ctl(admin: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = ctl_output(admin, args).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `ctl nodes` once it shows what `want` accepts (another process: poll).
pub async fn nodes_until(
    admin: SocketAddr,
    want: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let rows = nodes_json(admin).await;
        if want(&rows) {
            return rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never as wanted: {rows:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `ctl --json ARGS…` parsed, also when the node flags it as its last
/// known state (exit 2: no leader right now).
pub async fn ctl_json<T: serde::de::DeserializeOwned>(admin: SocketAddr, args: &[&str]) -> T {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ctl_output(admin, &all).await;
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 2)),
        "{args:?}: {text}{stderr}"
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}{stderr}"))
}

/// `ctl nodes --json`.
pub async fn nodes_json(admin: SocketAddr) -> Vec<serde_json::Value> {
    ctl_json(admin, &["nodes"]).await
}

/// `n` members, all up and voting ("changing" while a membership change
/// between voter sets is under way). Until then a cluster still growing
/// from its first voter cannot elect without that voter (raft's joint
/// consensus needs the old configuration too), so tests that kill nodes
/// wait for it.
pub fn all_voting(rows: &[serde_json::Value], n: usize) -> bool {
    rows.len() == n
        && rows
            .iter()
            .all(|r| r["state"] == "up" && r["vote"] == "voter")
}

/// `all_voting`, and each member holds its delivery lease: it may
/// deliver, and its copies are taken (a holder keeps a copy only from a
/// primary that holds its lease).
pub fn all_delivering(rows: &[serde_json::Value], n: usize) -> bool {
    all_voting(rows, n) && rows.iter().all(|r| r["delivers"] == true)
}

/// `GET /metrics` from the admin API at `admin`, parsed as the Prometheus
/// text format.
pub async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).unwrap()
}

/// The value of `metric` with exactly these labels among others, if any
/// (counters, gauges and untyped samples).
pub fn sample(s: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::Value;
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .find_map(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// A single node `name` under `dir`: SMTP on `smtp` relaying for
/// loopback, mail for a.example to `hop` (retried only after an hour, so
/// what it defers stays queued), everything else into `data/outbox`, the
/// admin API on `admin`. Returns the file's path.
pub fn relay_config(
    dir: &Path,
    name: &str,
    smtp: SocketAddr,
    admin: SocketAddr,
    hop: SocketAddr,
) -> std::path::PathBuf {
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
retry = ["1h"]

[[route]]
domains = ["a.example"]
next_hops = ["{hop}"]

[[route]]
domains = ["*"]
drop_dir = "{data}/outbox"

[admin]
listen = "{admin}"

[log]
format = "json"
level = "info"
"#,
        data = dir.join("data").display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}
