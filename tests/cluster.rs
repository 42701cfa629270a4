//! Real `mtad` processes form a cluster from their seeds; a node with the
//! wrong secret is refused and says why.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::daemon::{free_port, Daemon};

/// Write node `name`'s config: SMTP and cluster on free loopback ports.
fn write_config(
    dir: &Path,
    name: &str,
    cluster: SocketAddr,
    seeds: &[SocketAddr],
    key: &Path,
) -> PathBuf {
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!(
        r#"
[node]
name = "{name}"
data_dir = "{data}"

[smtp]
listen = ["127.0.0.1:0"]

[[route]]
domains = ["*"]
drop_dir = "{data}/outbox"

[cluster]
name = "test"
listen = "{cluster}"
seeds = [{seeds}]
secret_file = "{key}"
heartbeat_interval = "50ms"
election_timeout = "300ms"
join_backoff_min = "20ms"
join_backoff_max = "300ms"

[log]
format = "json"
level = "info"
"#,
        data = dir.join(name).display(),
        seeds = seeds.join(", "),
        key = key.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn key(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, secret).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_form_a_cluster_and_a_wrong_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = key(
        dir.path(),
        "good.key",
        "the right cluster secret, long enough",
    );
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    for (i, name) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        let cfg = write_config(dir.path(), name, addrs[i], &addrs, &good);
        nodes.push(Daemon::start(&cfg).await);
    }
    // node-a has the lowest name: it bootstraps; the others are admitted.
    nodes[0]
        .wait_line(|l| l.contains("bootstrapped a new cluster"))
        .await;
    for n in &mut nodes[1..] {
        n.wait_line(|l| l.contains("\"message\":\"admitted\""))
            .await;
    }
    for n in &mut nodes {
        n.wait_line(|l| l.contains("joined the cluster")).await;
    }

    // A fourth node with another secret: both sides name the reason, and
    // the cluster does not admit it.
    let bad = key(dir.path(), "bad.key", "some other secret, also long enough");
    let cfg = write_config(dir.path(), "node-d", free_port(), &addrs[..1], &bad);
    let mut rogue = Daemon::start(&cfg).await;
    rogue
        .wait_line(|l| l.contains("not in a cluster yet") && l.contains("secret"))
        .await;
    nodes[0]
        .wait_line(|l| l.contains("node-d") || l.contains("secret"))
        .await;

    for mut n in nodes.into_iter().chain([rogue]) {
        n.child.start_kill().unwrap();
        n.child.wait().await.unwrap();
    }
}
