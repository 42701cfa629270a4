//! A real `mtad` process for tests: started from a config file, its log
//! read line by line so tests can await what it says.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;

/// A port nothing listens on right now (bound and released).
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A running `mtad run`.
pub struct Daemon {
    /// The process.
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

/// Read the daemon's log continuously: a full pipe would block its logging.
fn drain(stdout: ChildStdout) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
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
        let mut argv: Vec<String> = prefix.to_vec();
        argv.push(env!("CARGO_BIN_EXE_mtad").into());
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = drain(child.stdout.take().unwrap());
        let mut d = Daemon { child, lines };
        d.wait_line(|l| l.contains("mtad ready")).await;
        d
    }

    /// Read log lines until one satisfies `want` and return it; panics if
    /// the log ends first.
    pub async fn wait_line(&mut self, mut want: impl FnMut(&str) -> bool) -> String {
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                if want(&line) {
                    return line;
                }
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
