//! `mtad ctl queue …` against a running `mtad run`: mail to a next hop
//! that defers it waits in the queue, and the operator lists, shows,
//! holds (across a restart), releases, flushes, deletes and bounces it.

mod common;

use std::net::SocketAddr;

use common::client::Client;
use common::daemon::{ctl, ctl_output, free_port, relay_config, Daemon};
use common::peer::{Behavior, Peer};
use serde_json::Value;

async fn json(admin: SocketAddr, args: &[&str]) -> Value {
    let (ok, text) = ctl(admin, &[&["--json"], args].concat()).await;
    assert!(ok, "ctl {args:?}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The queue listing, once `want` accepts it (delivery runs in another
/// process: poll).
async fn list_until(
    admin: SocketAddr,
    args: &[&str],
    want: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let wait = async {
        loop {
            let mut all = vec!["queue", "list"];
            all.extend_from_slice(args);
            let page = json(admin, &all).await;
            let rows = page["messages"].as_array().cloned().unwrap_or_default();
            if want(&rows) {
                return rows;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(common::node::PATIENCE, wait)
        .await
        .expect("queue listing in time")
}

fn ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn attempts(rows: &[Value], id: &str) -> u64 {
    let row = rows.iter().find(|r| r["id"] == id).unwrap();
    row["attempts"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_inspects_and_acts_on_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start(Behavior::rcpt_reply("451 4.2.0 mailbox busy")).await;
    let (smtp, admin) = (free_port(), free_port());
    let config = relay_config(dir.path(), "q", smtp, admin, peer.addr);
    let mut daemon = Daemon::start(&config).await;

    let mut c = Client::connect(smtp).await.unwrap();
    for i in 0..5 {
        let body = format!("Subject: note {i}\r\nFrom: s@b.example\r\n\r\nhello\r\n");
        let r = c
            .send("s@b.example", &["u@a.example"], &body)
            .await
            .unwrap();
        assert!(r.starts_with("250"), "{r}");
    }
    let deferred =
        |rows: &[Value]| rows.len() == 5 && rows.iter().all(|r| r["state"] == "deferred");
    let rows = list_until(admin, &[], deferred).await;
    let all = ids(&rows);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "oldest first: {all:?}");

    // Summary: one destination, everything deferred, the peer's reply.
    let summary = json(admin, &["queue", "summary"]).await;
    let row = &summary[0];
    assert_eq!(row["name"], peer.addr.to_string());
    assert_eq!(
        (row["messages"].as_u64(), row["deferred"].as_u64()),
        (Some(5), Some(5))
    );
    assert!(
        row["last_error"].as_str().unwrap().contains("mailbox busy"),
        "{row}"
    );
    let (ok, table) = ctl(admin, &["queue", "summary"]).await;
    assert!(
        ok && table.contains("DESTINATION") && table.contains("mailbox busy"),
        "{table}"
    );

    // Paging: two at a time, continued after the last id.
    let page = json(admin, &["queue", "list", "--limit", "2"]).await;
    assert_eq!(ids(page["messages"].as_array().unwrap()), all[..2]);
    let after = page["next"].as_str().unwrap();
    let rest = json(admin, &["queue", "list", "--after", after]).await;
    assert_eq!(ids(rest["messages"].as_array().unwrap()), all[2..]);
    assert!(rest["next"].is_null());

    // Show: envelope, attempts, last reply, headers.
    let shown = json(admin, &["queue", "show", &all[0]]).await;
    assert_eq!(shown["message"]["sender"], "s@b.example");
    assert_eq!(shown["recipients"][0]["address"], "u@a.example");
    assert_eq!(shown["recipients"][0]["attempts"], 1);
    assert!(
        shown["headers"]
            .as_str()
            .unwrap()
            .contains("Subject: note 0"),
        "{shown}"
    );
    let (ok, missing) = ctl(admin, &["queue", "show", "00000000000000FF"]).await;
    assert!(!ok && missing.contains("no message"), "{missing}");

    // Hold survives a restart; flush skips what is held.
    let held = json(admin, &["queue", "hold", &all[0]]).await;
    assert_eq!(held["changed"], 1);
    daemon.child.start_kill().unwrap();
    daemon.child.wait().await.unwrap();
    let _daemon = Daemon::start(&config).await;
    let rows = list_until(admin, &["--state", "held"], |r| !r.is_empty()).await;
    assert_eq!(ids(&rows), [all[0].clone()]);
    // After the restart the others are retried once at start; flush
    // sends them again at once rather than in an hour.
    let again = |rows: &[Value]| rows.len() == 4 && rows.iter().all(|r| r["attempts"] == 2);
    list_until(admin, &["--state", "deferred"], again).await;
    let flushed = json(admin, &["queue", "flush"]).await;
    assert_eq!(flushed["changed"], 4);
    let thrice = |rows: &[Value]| rows.len() == 4 && rows.iter().all(|r| r["attempts"] == 3);
    list_until(admin, &["--state", "deferred"], thrice).await;
    let rows = list_until(admin, &[], |r| r.len() == 5).await;
    assert_eq!(
        attempts(&rows, &all[0]),
        1,
        "the held message was not tried"
    );

    // Release: dispatched at once.
    json(admin, &["queue", "release", &all[0]]).await;
    list_until(admin, &[], |r| attempts(r, &all[0]) == 2).await;

    // Delete asks first: without a terminal and without --yes, nothing.
    let out = ctl_output(admin, &["queue", "delete", &all[1]]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    list_until(admin, &[], |r| r.len() == 5).await;
    let deleted = json(admin, &["queue", "delete", "--yes", &all[1]]).await;
    assert_eq!(deleted["changed"], 1);
    list_until(admin, &[], |r| r.len() == 4).await;

    // Bounce by destination: a DSN to each sender (dropped in the outbox).
    let dest = peer.addr.to_string();
    let (ok, text) = ctl(admin, &["queue", "delete", "--dest", &dest]).await;
    assert!(!ok, "a filter without --yes is refused too: {text}");
    let bounced = json(admin, &["queue", "bounce", "--yes", "--dest", &dest]).await;
    assert_eq!(bounced["changed"], 4);
    list_until(admin, &[], |r| r.is_empty()).await;
    let outbox = dir.path().join("data/outbox");
    for f in common::node::files_arrive(&outbox, 4).await {
        let dsn = std::fs::read_to_string(f).unwrap();
        assert!(dsn.contains("5.0.0"), "{dsn}");
    }

    // Bad input gets a clear answer, naming the option that was missing.
    let (ok, text) = ctl(admin, &["queue", "hold"]).await;
    assert!(!ok && text.contains("--all"), "{text}");
    let out = ctl_output(admin, &["queue", "delete", "--yes"]).await;
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("--all for every queued message"), "{text}");
    let (ok, text) = ctl(admin, &["queue", "list", "--state", "stuck"]).await;
    assert!(!ok && text.contains("unknown state"), "{text}");
}

/// `--admin`, `--token-file` and `--json` go anywhere after `ctl`, as
/// operators type them: after the subcommand too.
#[tokio::test]
async fn ctl_options_go_before_or_after_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let hop = "127.0.0.1:9".parse().unwrap();
    let cfg = relay_config(dir.path(), "ctl", free_port(), admin, hop);
    let _node = Daemon::start(&cfg).await;
    let url = format!("http://{admin}");
    for args in [
        vec!["ctl", "queue", "summary", "--admin", &url, "--json"],
        vec!["ctl", "--json", "queue", "--admin", &url, "summary"],
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mtad"))
            .args(&args)
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Value = serde_json::from_str(&text).unwrap();
        assert!(rows.is_array(), "{text}");
    }
}
