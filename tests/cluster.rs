//! Real `mtad` processes form a cluster from their seeds; a node with the
//! wrong secret is refused and says why; a man in the middle learns
//! nothing and gets nothing in.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::daemon::{
    all_voting, ctl, ctl_json, ctl_output, free_port, nodes_json, nodes_until, sample, scrape,
    Daemon,
};
use common::proxy::{frames, Inject, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Write node `name`'s config: SMTP on a free loopback port.
fn write_config(
    dir: &Path,
    name: &str,
    cluster: SocketAddr,
    seeds: &[SocketAddr],
    key: &Path,
    admin: SocketAddr,
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

[admin]
listen = "{admin}"

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
    let Three {
        mut nodes,
        addrs,
        admin,
        ..
    } = Three::start(dir.path()).await;
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

    // ctl sees three members, all up and (once promoted) voting, node-a
    // (the bootstrapper) leading.
    let rows = nodes_until(admin[1], |rows| {
        rows.len() == 3
            && rows
                .iter()
                .all(|r| r["state"] == "up" && r["vote"] == "voter")
    })
    .await;
    let leaders: Vec<_> = rows.iter().filter(|r| r["leader"] == true).collect();
    assert_eq!(leaders.len(), 1);
    assert_eq!(leaders[0]["name"], "node-a");
    let (ok, text) = ctl(admin[0], &["status"]).await;
    assert!(ok && text.contains("cluster: leader"), "{text}");

    // A fourth node with another secret: both sides name the reason, and
    // the cluster does not admit it.
    let bad = key(dir.path(), "bad.key", "some other secret, also long enough");
    let (rogue, rogue_admin) = outsider(dir.path(), addrs[0], &bad).await;
    // Its ctl says so too, and exits 2: answered, but not in its cluster.
    let out = ctl_output(rogue_admin, &["status"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("secrets differ"), "{err}");
    nodes[0]
        .wait_line(|l| l.contains("node-d") || l.contains("secret"))
        .await;
    let rows = nodes_json(admin[0]).await;
    assert_eq!(rows.len(), 3, "the cluster is unchanged: {rows:?}");
    assert!(rows.iter().all(|r| r["name"] != "node-d"), "{rows:?}");

    // node-c dies: the leader publishes it down, ctl shows it, and an
    // operator evicts it.
    nodes[2].child.start_kill().unwrap();
    nodes[2].child.wait().await.unwrap();
    nodes[0]
        .wait_line(|l| {
            l.contains("member state changed") && l.contains("node-c") && l.contains("Down")
        })
        .await;
    let rows = nodes_json(admin[0]).await;
    let c = rows.iter().find(|r| r["name"] == "node-c").unwrap();
    assert_eq!(c["state"], "down");
    let (ok, text) = ctl(admin[1], &["evict", "node-c"]).await;
    assert!(
        !ok && text.contains("not the leader"),
        "a follower refuses: {text}"
    );
    let (ok, text) = ctl(admin[0], &["evict", "node-c"]).await;
    assert!(ok, "{text}");
    assert_eq!(nodes_json(admin[0]).await.len(), 2);
    // An unreachable admin API is a clear error, not a hang.
    let (ok, text) = ctl(admin[2], &["nodes"]).await;
    assert!(!ok && text.contains("cannot reach the admin API"), "{text}");

    // node-b dies too: node-a has no majority left. It still answers at
    // once, with its last known state and a flag saying so.
    nodes[1].child.start_kill().unwrap();
    nodes[1].child.wait().await.unwrap();
    until_quorum(admin[0], false).await;
    let out = ctl_output(admin[0], &["nodes"]).await;
    assert_eq!(out.status.code(), Some(2), "answered, but flagged");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no working majority"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node-b"),
        "last known state"
    );

    for mut n in nodes.into_iter().chain([rogue]) {
        let _ = n.child.start_kill();
        n.child.wait().await.unwrap();
    }
}

/// The cluster links are sealed: a recording of node-b's join shows
/// nothing but the Hellos, a rogue process that replays the recording to
/// node-a is refused, and a frame repeated into a live link ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_replaying_captured_link_traffic_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = key(
        dir.path(),
        "good.key",
        "the right cluster secret, long enough",
    );
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    let admin: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    let cfg = write_config(dir.path(), "node-a", addrs[0], &[], &good, admin[0]);
    let mut a = Daemon::start(&cfg).await;
    a.wait_line(|l| l.contains("bootstrapped a new cluster"))
        .await;

    // node-b joins through a tap that records what it sends.
    let tap = Proxy::start(addrs[0], vec![]).await;
    let cfg = write_config(dir.path(), "node-b", addrs[1], &[tap.addr], &good, admin[1]);
    let mut b = Daemon::start(&cfg).await;
    b.wait_line(|l| l.contains("joined the cluster")).await;
    // Whole connections only: past the handshake, with sealed frames.
    let captured: Vec<Vec<u8>> = tap
        .captured()
        .into_iter()
        .filter(|c| frames(c).len() > 2)
        .collect();
    assert!(!captured.is_empty(), "the join went through the tap");
    let text = String::from_utf8_lossy(&captured.concat()).into_owned();
    assert!(text.contains(r#""type":"hello""#), "{text}");
    // The join request (its kind, node-b's address) is not readable.
    for secret in ["Join", "Status", &addrs[1].to_string()] {
        assert!(!text.contains(secret), "{secret:?} readable in {text:?}");
    }

    // A rogue process replays each recorded connection to node-a: its
    // proof was for another connection's challenge.
    for session in &captured {
        let mut rogue = tokio::net::TcpStream::connect(addrs[0]).await.unwrap();
        let _ = rogue.write_all(session).await;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n @ 1..)) =
            tokio::time::timeout(common::node::PATIENCE, rogue.read(&mut buf)).await
        {
            answer.extend_from_slice(&buf[..n]);
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.contains("bad_proof"), "{answer}");
    }
    a.wait_line(|l| l.contains("cluster link failed") && l.contains("bad proof"))
        .await;

    // node-c joins through a man in the middle. Into its first connection
    // he splices a sealed frame recorded from node-b's; into its second
    // he repeats its own first sealed frame. node-a ends both links, and
    // node-c gets in on a clean third.
    let recorded = frames(&captured[0])[2].clone();
    let inject = vec![
        Inject::Splice {
            after: 1,
            frame: recorded,
        },
        Inject::Repeat { after: 2 },
    ];
    let mitm = Proxy::start(addrs[0], inject).await;
    let cfg = write_config(
        dir.path(),
        "node-c",
        addrs[2],
        &[mitm.addr],
        &good,
        admin[2],
    );
    let mut c = Daemon::start(&cfg).await;
    for _ in 0..2 {
        a.wait_line(|l| l.contains("failed authentication")).await;
    }
    c.wait_line(|l| l.contains("joined the cluster")).await;
    let rows = nodes_until(admin[0], |rows| {
        rows.len() == 3 && rows.iter().all(|r| r["state"] == "up")
    })
    .await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        mitm.captured().len() >= 3,
        "two links ended, a third got in"
    );
    // And node-a counts what it refused, for alerts.
    let m = scrape(admin[0]).await;
    let refused = |reason| {
        let labels = [("reason", reason)];
        sample(&m, "mtad_cluster_link_refusals_total", &labels).unwrap_or(0.0)
    };
    assert!(refused("bad_proof") >= captured.len() as f64);
    assert!(refused("forged") >= 2.0);

    for mut n in [a, b, c] {
        let _ = n.child.start_kill();
        n.child.wait().await.unwrap();
    }
}

/// node-d, with the secret in `key`, trying to join through `seed`; once
/// it has logged that the secrets differ. Also returns its admin address.
async fn outsider(dir: &Path, seed: SocketAddr, key: &Path) -> (Daemon, SocketAddr) {
    let admin = free_port();
    let cfg = write_config(dir, "node-d", free_port(), &[seed], key, admin);
    let mut d = Daemon::start(&cfg).await;
    d.wait_line(|l| l.contains("not in a cluster yet") && l.contains("secret"))
        .await;
    (d, admin)
}

/// Three nodes node-a, node-b, node-c, started together from the same seeds.
struct Three {
    nodes: Vec<Daemon>,
    configs: Vec<PathBuf>,
    addrs: Vec<SocketAddr>,
    admin: Vec<SocketAddr>,
}

impl Three {
    async fn start(dir: &Path) -> Three {
        let good = key(dir, "good.key", "the right cluster secret, long enough");
        let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
        let admin: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        let mut configs = Vec::new();
        for (i, name) in ["node-a", "node-b", "node-c"].iter().enumerate() {
            let cfg = write_config(dir, name, addrs[i], &addrs, &good, admin[i]);
            nodes.push(Daemon::start(&cfg).await);
            configs.push(cfg);
        }
        Three {
            nodes,
            configs,
            addrs,
            admin,
        }
    }
}

fn sigterm(d: &Daemon) {
    let pid = d.child.id().unwrap() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_gracefully_and_a_restart_is_up_again() {
    let dir = tempfile::tempdir().unwrap();
    let Three {
        mut nodes,
        configs,
        admin,
        ..
    } = Three::start(dir.path()).await;
    let voting = |rows: &[serde_json::Value]| all_voting(rows, 3);
    nodes_until(admin[1], voting).await;
    // The leader (node-a, which bootstrapped) is stopped with SIGTERM: it
    // hands over, is published as left — not down — and exits 0.
    sigterm(&nodes[0]);
    nodes[0]
        .wait_line(|l| l.contains("handed leadership over"))
        .await;
    let status = nodes[0].child.wait().await.unwrap();
    assert!(status.success(), "{status}");
    let rows = nodes_until(admin[1], |rows| {
        rows.iter()
            .any(|r| r["name"] == "node-a" && r["state"] == "left")
            && rows.iter().any(|r| r["leader"] == true)
    })
    .await;
    let leader = rows.iter().find(|r| r["leader"] == true).unwrap();
    assert_ne!(leader["name"], "node-a", "{rows:?}");
    // Back with its data dir: the same member, up again.
    nodes[0] = Daemon::start(&configs[0]).await;
    nodes[0]
        .wait_line(|l| l.contains("joined the cluster"))
        .await;
    nodes_until(admin[2], voting).await;
    for mut n in nodes {
        let _ = n.child.start_kill();
        n.child.wait().await.unwrap();
    }
}

/// Stop `d` with SIGTERM; it exits 0.
async fn stop(d: &mut Daemon) {
    sigterm(d);
    assert!(d.child.wait().await.unwrap().success());
}

/// Copy directory `from` to `to` (which must not exist), files and all.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_restored_from_an_older_copy_is_refused_and_stops_raft() {
    let dir = tempfile::tempdir().unwrap();
    let Three {
        mut nodes,
        configs,
        admin,
        ..
    } = Three::start(dir.path()).await;
    let voting = |rows: &[serde_json::Value]| all_voting(rows, 3);
    nodes_until(admin[0], voting).await;
    // A backup of node-c's cluster state, taken while it is stopped.
    let state = dir.path().join("node-c/cluster");
    let backup = dir.path().join("backup");
    stop(&mut nodes[2]).await;
    copy_dir(&state, &backup);
    // It runs on past the backup: the cluster sees a later start.
    nodes[2] = Daemon::start(&configs[2]).await;
    nodes[2]
        .wait_line(|l| l.contains("joined the cluster"))
        .await;
    nodes_until(admin[0], voting).await;
    stop(&mut nodes[2]).await;
    // The backup comes back: refused, and its raft stops taking part.
    std::fs::remove_dir_all(&state).unwrap();
    copy_dir(&backup, &state);
    nodes[2] = Daemon::start(&configs[2]).await;
    nodes[2].wait_line(|l| l.contains("an older copy")).await;
    let status: serde_json::Value = ctl_json(admin[2], &["status"]).await;
    let problem = status["cluster_problem"].as_str().unwrap_or_default();
    assert!(
        problem.starts_with("this data directory is an older copy"),
        "{status}"
    );
    // The others carry on with a quorum of two.
    let (ok, text) = ctl(admin[0], &["status"]).await;
    assert!(ok, "{text}");
    for mut n in nodes {
        let _ = n.child.start_kill();
        let _ = n.child.wait().await;
    }
}

/// Point the config at `proving`, also accepting `accepted`.
fn rekey(cfg: &Path, proving: &Path, accepted: &[&Path]) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let accepted: Vec<String> = accepted
        .iter()
        .map(|p| format!("\"{}\"", p.display()))
        .collect();
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("accept_secret_files"))
        .map(|l| match l.starts_with("secret_file") {
            true => format!(
                "secret_file = \"{}\"\naccept_secret_files = [{}]",
                proving.display(),
                accepted.join(", ")
            ),
            false => l.to_string(),
        })
        .collect();
    std::fs::write(cfg, lines.join("\n")).unwrap();
}

/// Until the node's ctl says it does (or does not) see a working
/// majority; ctl is another process, so it is asked again every 50 ms.
async fn until_quorum(admin: SocketAddr, want: bool) {
    let seen = async {
        loop {
            let out = ctl_output(admin, &["--json", "status"]).await;
            if let Ok(s) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                if s["quorum"] == want {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(common::node::PATIENCE, seen)
        .await
        .unwrap_or_else(|_| panic!("quorum never {want}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_secret_changes_node_by_node_without_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let Three {
        mut nodes,
        configs,
        addrs,
        admin,
    } = Three::start(dir.path()).await;
    nodes_until(admin[0], |rows| all_voting(rows, 3)).await;
    let old = dir.path().join("good.key");
    let new = key(
        dir.path(),
        "new.key",
        "the next cluster secret, long enough",
    );
    // The three steps of README "Changing the cluster secret", each done
    // on one node after the other: every restarted node must find a
    // working majority again, over links its peers open and it opens.
    let steps: [(&Path, Vec<&Path>); 3] = [(&old, vec![&new]), (&new, vec![&old]), (&new, vec![])];
    let names = ["node-a", "node-b", "node-c"];
    for (proving, accepted) in &steps {
        for i in 0..3 {
            // Killed, it is published down by the others; restarted with
            // its new keyring, it is published up only once raft traffic
            // flows again between it and the leader.
            let other = admin[(i + 1) % 3];
            let state_of = |rows: &[serde_json::Value]| {
                let row = rows.iter().find(|r| r["name"] == names[i]);
                row.map(|r| r["state"].as_str().unwrap_or("").to_string())
            };
            nodes[i].child.start_kill().unwrap();
            nodes[i].child.wait().await.unwrap();
            nodes_until(other, |rows| state_of(rows).as_deref() == Some("down")).await;
            rekey(&configs[i], proving, accepted);
            nodes[i] = Daemon::start(&configs[i]).await;
            nodes_until(other, |rows| {
                state_of(rows).as_deref() == Some("up") && all_voting(rows, 3)
            })
            .await;
            until_quorum(admin[i], true).await;
            // Its status names the keyring it now has, by fingerprints.
            let fingerprint = |p: &Path| {
                let text = std::fs::read(p).unwrap();
                mtad::cluster::identity::Secret::new(&text)
                    .unwrap()
                    .fingerprint()
            };
            let want: Vec<String> = std::iter::once(*proving)
                .chain(accepted.iter().copied())
                .map(fingerprint)
                .collect();
            let status: serde_json::Value = ctl_json(admin[i], &["status"]).await;
            assert_eq!(status["secrets"], serde_json::json!(want), "{status}");
        }
    }
    // Done: a node with only the old secret is refused.
    let (rogue, _) = outsider(dir.path(), addrs[0], &old).await;
    for mut n in nodes.into_iter().chain([rogue]) {
        let _ = n.child.start_kill();
        n.child.wait().await.unwrap();
    }
}

#[test]
fn check_config_reports_every_unusable_secret_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.key");
    let short = key(dir.path(), "short.key", "too short");
    let cfg = write_config(
        dir.path(),
        "node-a",
        free_port(),
        &[],
        &missing,
        free_port(),
    );
    rekey(&cfg, &missing, &[&short]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtad"))
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    // Each at its own line of the file, as every config error is.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let line_of = |key: &str| 1 + text.lines().position(|l| l.starts_with(key)).unwrap();
    let at = |key: &str| format!("{}:{}:", cfg.display(), line_of(key));
    assert!(lines[0].starts_with(&at("secret_file")), "{err}");
    assert!(lines[0].contains("cluster.secret_file") && lines[0].contains("missing.key"));
    assert!(lines[1].starts_with(&at("accept_secret_files")), "{err}");
    assert!(lines[1].contains("cluster.accept_secret_files[0]") && lines[1].contains("short.key"));
    assert!(lines[1].contains("at least 16"), "{err}");
}
