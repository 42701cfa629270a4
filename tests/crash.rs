//! kill -9 under load: every message the node acknowledged is delivered
//! after a restart.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::client::Client;
use common::daemon::{free_port, Daemon};

const CLIENTS: usize = 8;
/// Acknowledged messages before the kill; the clients keep sending, so
/// the kill lands in the middle of transactions and fsync batches.
const KILL_AFTER: usize = 150;

fn write_config(dir: &Path, listen: SocketAddr, route: &str) -> std::path::PathBuf {
    let path = dir.join("mtad.toml");
    let text = format!(
        r#"
[node]
name = "crash"
data_dir = "{data}"
shutdown_grace = "2s"

[smtp]
listen = ["{listen}"]
hostname = "mx.example.test"

[delivery]
retry = ["1h"]

{route}

[log]
format = "json"
level = "info"
"#,
        data = dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    // First life: the next hop refuses connections, so everything
    // acknowledged stays queued in the spool.
    let dead_hop = free_port();
    let route =
        format!("[[route]]\ndomains = [\"*\"]\nnext_hops = [\"{dead_hop}\"]\ntls = \"none\"");
    let config = write_config(dir.path(), listen, &route);
    let mut daemon = Daemon::start(&config).await;

    let acked = Arc::new(Mutex::new(HashSet::new()));
    let (enough_tx, mut enough) = tokio::sync::watch::channel(0usize);
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let acked = acked.clone();
        let enough_tx = enough_tx.clone();
        clients.push(tokio::spawn(async move {
            let Ok(mut client) = Client::connect(listen).await else {
                return;
            };
            for i in 0.. {
                let subject = format!("crash-{c}-{i}");
                let body = format!("Subject: {subject}\r\n\r\n{}\r\n", "x".repeat(2000));
                match client
                    .send("a@example.test", &["b@dest.example"], &body)
                    .await
                {
                    Ok(r) if r.starts_with("250") => {
                        let n = {
                            let mut a = acked.lock().unwrap();
                            a.insert(subject);
                            a.len()
                        };
                        enough_tx.send_replace(n);
                    }
                    // The daemon died mid-transaction: not acknowledged.
                    _ => return,
                }
            }
        }));
    }
    enough.wait_for(|n| *n >= KILL_AFTER).await.unwrap();
    daemon.child.start_kill().unwrap();
    daemon.child.wait().await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= KILL_AFTER);

    // Second life: deliver into a drop directory and count deliveries.
    let outbox = dir.path().join("outbox");
    let route = format!(
        "[[route]]\ndomains = [\"*\"]\ndrop_dir = \"{}\"",
        outbox.display()
    );
    let config = write_config(dir.path(), listen, &route);
    let mut daemon = Daemon::start(&config).await;
    // More than the acknowledged may arrive: a message can be stored and
    // the process killed before its 250 went out. So wait, delivery by
    // delivery (each logs an event after its file is written), until every
    // acknowledged one is there; none may come twice.
    let subjects = || {
        let mut found = HashSet::new();
        for f in common::node::eml_files(&outbox) {
            let text = std::fs::read_to_string(f).unwrap();
            let subject = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap()
                .to_string();
            assert!(found.insert(subject.clone()), "{subject} delivered twice");
        }
        found
    };
    let mut found = subjects();
    while !acked.is_subset(&found) {
        let delivery = daemon.wait_line(|l| l.contains("\"event\":\"delivered\""));
        if tokio::time::timeout(common::node::PATIENCE / 2, delivery)
            .await
            .is_err()
        {
            break;
        }
        found = subjects();
    }
    let lost: Vec<_> = acked.difference(&found).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    daemon.child.start_kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_keeps_queued_mail() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let dead_hop = free_port();
    let route =
        format!("[[route]]\ndomains = [\"*\"]\nnext_hops = [\"{dead_hop}\"]\ntls = \"none\"");
    let config = write_config(dir.path(), listen, &route);
    let mut daemon = Daemon::start(&config).await;
    let mut idle = Client::connect(listen).await.unwrap();
    let reply = idle
        .send(
            "a@example.test",
            &["b@dest.example"],
            "Subject: kept\r\n\r\nx\r\n",
        )
        .await
        .unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    // A transaction is under way when SIGTERM comes.
    let mut busy = Client::connect(listen).await.unwrap();
    assert!(busy
        .command("MAIL FROM:<c@example.test>\r\n")
        .await
        .unwrap()
        .starts_with("250"));
    assert!(busy
        .command("RCPT TO:<d@dest.example>\r\n")
        .await
        .unwrap()
        .starts_with("250"));
    daemon.signal(libc::SIGTERM);
    // New clients are turned away at once...
    let turned_away = async {
        loop {
            match Client::connect(listen).await {
                Err(e) if e.to_string().contains("421") => return,
                // Not yet draining (the signal is being handled): again.
                _ => tokio::task::yield_now().await,
            }
        }
    };
    tokio::time::timeout(common::node::PATIENCE, turned_away)
        .await
        .expect("a new client gets 421");
    // ...while the open transaction completes and the client leaves.
    assert!(busy.command("DATA\r\n").await.unwrap().starts_with("354"));
    let r = busy
        .command("Subject: in flight\r\n\r\nx\r\n.\r\n")
        .await
        .unwrap();
    assert!(
        r.starts_with("250"),
        "the transaction in flight completes: {r}"
    );
    // Then it is told to go, as the idle session was at once.
    let last = busy.reply().await.unwrap_or_default();
    assert!(
        last.starts_with("421 4.3.2"),
        "after its transaction: {last:?}"
    );
    let last = idle.reply().await.unwrap_or_default();
    assert!(last.starts_with("421 4.3.2"), "open session got {last:?}");
    let status = tokio::time::timeout(common::node::PATIENCE, daemon.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "mtad exited with {status}");
    // Restarted with a working route, the queued message is delivered.
    let outbox = dir.path().join("outbox");
    let route = format!(
        "[[route]]\ndomains = [\"*\"]\ndrop_dir = \"{}\"",
        outbox.display()
    );
    let mut daemon = Daemon::start(&write_config(dir.path(), listen, &route)).await;
    for _ in 0..2 {
        daemon
            .wait_line(|l| l.contains("\"event\":\"delivered\""))
            .await;
    }
    let files = common::node::eml_files(&outbox);
    let bodies: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert_eq!(bodies.len(), 2);
    assert!(bodies.iter().any(|b| b.contains("Subject: kept")));
    assert!(bodies.iter().any(|b| b.contains("Subject: in flight")));
    daemon.child.start_kill().unwrap();
}
