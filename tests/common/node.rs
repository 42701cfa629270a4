//! Start an in-process node from TOML and wait for its outcome counts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mtad::app::Node;
use mtad::config::{load_str, Config};
use mtad::queue::Stats;
use mtad::spool::Spool;

/// How long a test waits for mail before it gives up and fails. Generous:
/// it bounds a broken test, it does not measure anything.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A config on 127.0.0.1:0 (any free port) with data under `dir`, plus
/// `extra` TOML (routes, [delivery] or [smtp] keys after `smtp_extra`).
pub fn config(dir: &Path, smtp_extra: &str, rest: &str) -> Config {
    let text = format!(
        r#"
[node]
name = "test"
data_dir = "{data}"

[smtp]
listen = ["127.0.0.1:0"]
hostname = "mx.example.test"
{smtp_extra}

{rest}
"#,
        data = dir.join("data").display()
    );
    match load_str(&text, "test.toml") {
        Ok(c) => c,
        Err(e) => panic!("test config is invalid:\n{e}\n{text}"),
    }
}

/// Start a node on its durable spool.
pub async fn start(cfg: Config) -> Node {
    Node::start(cfg).await.expect("node starts")
}

/// Start a node on the given spool.
pub async fn start_on(cfg: Config, spool: Arc<dyn Spool>) -> Node {
    Node::start_with_spool(cfg, spool)
        .await
        .expect("node starts")
}

/// Wait until the node's counts satisfy `done`; panics after PATIENCE.
pub async fn wait_for(node: &Node, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    let mut rx = node.stats();
    let got = tokio::time::timeout(PATIENCE, rx.wait_for(|s| done(s)))
        .await
        .map(|r| r.map(|s| *s));
    match got {
        Ok(Ok(s)) => s,
        _ => panic!(
            "timed out waiting for {what}; stats now {:?}",
            *node.stats().borrow()
        ),
    }
}

/// `.eml` files in `dir`, sorted by name.
pub fn eml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The `.eml` files in `dir` once there are at least `n` (polled: another
/// process writes them); panics after PATIENCE.
pub async fn files_arrive(dir: &Path, n: usize) -> Vec<std::path::PathBuf> {
    let wait = async {
        loop {
            let files = eml_files(dir);
            if files.len() >= n {
                return files;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    match tokio::time::timeout(PATIENCE, wait).await {
        Ok(files) => files,
        Err(_) => panic!("fewer than {n} messages arrived in {}", dir.display()),
    }
}
