//! A whole node relaying to the scripted peer: one transaction per
//! destination, retries, bounces and expiry, as a sender sees them.

mod common;

use common::client::Client;
use common::node::{config, eml_files, start, wait_for};
use common::peer::{Behavior, Fault, Peer};

/// Mail for dest.example goes to `peer`; mail for example.test (the
/// senders, who receive the bounces) goes into `dir/outbox`.
fn routes(peer: &Peer, dir: &std::path::Path) -> String {
    format!(
        "[[route]]\ndomains = [\"dest.example\"]\nnext_hops = [\"{}\"]\ntls = \"none\"\n\n\
         [[route]]\ndomains = [\"example.test\"]\ndrop_dir = \"{}\"\n",
        peer.addr,
        dir.join("outbox").display()
    )
}

fn delivery(retry: &str, lifetime: &str) -> String {
    format!("[delivery]\nretry = [\"{retry}\"]\nmax_queue_lifetime = \"{lifetime}\"\n")
}

async fn send(node: &mtad::app::Node, from: &str, to: &[&str]) -> String {
    let mut c = Client::connect(node.smtp_addrs()[0]).await.unwrap();
    let body = "Subject: test message\r\nFrom: <a@example.test>\r\n\r\nhello\r\n";
    c.send(from, to, body).await.unwrap()
}

fn only_bounce(dir: &std::path::Path) -> String {
    let files = eml_files(&dir.join("outbox"));
    assert_eq!(files.len(), 1, "expected exactly one DSN");
    std::fs::read_to_string(&files[0]).unwrap()
}

#[tokio::test]
async fn recipients_of_one_destination_share_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start(Behavior::default()).await;
    let node = start(config(dir.path(), "", &routes(&peer, dir.path()))).await;
    let to = ["x@dest.example", "y@dest.example", "z@DEST.example"];
    assert!(send(&node, "a@example.test", &to).await.starts_with("250"));
    wait_for(&node, "3 deliveries", |s| s.delivered == 3).await;
    let got = peer.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts.len(), 3);
    assert_eq!(got[0].mail_from, "a@example.test");
    let body = String::from_utf8_lossy(&got[0].body);
    assert!(
        body.starts_with("Received: from test.example ([127.0.0.1])"),
        "{body}"
    );
}

#[tokio::test]
async fn a_permanent_failure_bounces_to_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start(Behavior::rcpt_reply(
        "550 5.1.1 <x@dest.example>: no such user",
    ))
    .await;
    let node = start(config(dir.path(), "", &routes(&peer, dir.path()))).await;
    assert!(send(&node, "a@example.test", &["x@dest.example"])
        .await
        .starts_with("250"));
    // The bounce is itself a message, delivered to the sender's route.
    wait_for(&node, "a bounce and its delivery", |s| {
        s.bounced == 1 && s.delivered == 1
    })
    .await;
    let dsn = only_bounce(dir.path());
    assert!(dsn.starts_with("Return-Path: <>\r\n"), "{dsn}");
    assert!(dsn.contains("X-Mtad-Rcpt-To: <a@example.test>"));
    assert!(dsn.contains("report-type=delivery-status"));
    assert!(
        dsn.contains("Final-Recipient: rfc822; x@dest.example\r\nAction: failed\r\nStatus: 5.1.1")
    );
    assert!(dsn.contains("Diagnostic-Code: smtp; 550 5.1.1 <x@dest.example>: no such user"));
    assert!(
        dsn.contains("Subject: test message"),
        "original headers missing"
    );
}

#[tokio::test]
async fn a_temporary_failure_is_retried_and_then_delivered() {
    let dir = tempfile::tempdir().unwrap();
    // The first connection answers MAIL with 421 and closes; later ones accept.
    let peer = Peer::start(Behavior {
        close_421: Some(Fault::first(0)),
        ..Behavior::default()
    })
    .await;
    let rest = format!("{}\n{}", delivery("1s", "1h"), routes(&peer, dir.path()));
    let node = start(config(dir.path(), "", &rest)).await;
    assert!(send(&node, "a@example.test", &["x@dest.example"])
        .await
        .starts_with("250"));
    let s = wait_for(&node, "a deferral then a delivery", |s| s.delivered == 1).await;
    assert_eq!(s.deferred, 1);
    assert_eq!(s.bounced + s.expired, 0);
    assert_eq!(peer.messages().len(), 1);
    assert!(
        eml_files(&dir.path().join("outbox")).is_empty(),
        "no DSN for a retry"
    );
}

#[tokio::test]
async fn mail_that_stays_deferred_expires_with_a_4_4_7_bounce() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start(Behavior::rcpt_reply("451 4.2.0 mailbox busy")).await;
    // The next retry would fall after the queue lifetime: expire at once.
    let rest = format!("{}\n{}", delivery("1s", "1s"), routes(&peer, dir.path()));
    let node = start(config(dir.path(), "", &rest)).await;
    assert!(send(&node, "a@example.test", &["x@dest.example"])
        .await
        .starts_with("250"));
    wait_for(&node, "expiry and the DSN", |s| {
        s.expired == 1 && s.delivered == 1
    })
    .await;
    let dsn = only_bounce(dir.path());
    assert!(dsn.contains("Status: 4.4.7"), "{dsn}");
    assert!(dsn.contains("451 4.2.0 mailbox busy"));
}

#[tokio::test]
async fn mail_arriving_after_a_reload_that_removed_its_route_is_still_delivered() {
    // Two routes, then a reload leaves one: mail for other.example took the
    // second before, the first after. The queue, idle through the reload,
    // must not route it by a route that is no longer there.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let routes = |first: bool| {
        let one = format!(
            "[[route]]\ndomains = [\"a.example\"]\ndrop_dir = \"{}\"\n\n",
            a.display()
        );
        let all = format!(
            "[[route]]\ndomains = [\"*\"]\ndrop_dir = \"{}\"\n",
            b.display()
        );
        if first {
            one + &all
        } else {
            all
        }
    };
    let relay = "relay_networks = [\"127.0.0.0/8\"]";
    let node = start(config(dir.path(), relay, &routes(true))).await;
    // One message first: once it is delivered, the queue waits for the
    // next event with the configuration of before the reload in hand.
    let reply = send(&node, "s@example.test", &["r@a.example"]).await;
    assert!(reply.starts_with("250"), "{reply}");
    wait_for(&node, "the first delivery", |s| s.delivered == 1).await;
    let applied = node.reload(config(dir.path(), relay, &routes(false)));
    assert_eq!(applied.changed, ["route"], "routes change live");
    let reply = send(&node, "s@example.test", &["r@other.example"]).await;
    assert!(reply.starts_with("250"), "{reply}");
    wait_for(&node, "the second delivery", |s| s.delivered == 2).await;
    assert_eq!(eml_files(&b).len(), 1, "delivered by the route left");
    node.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn results_that_could_not_be_recorded_are_recorded_once_the_spool_recovers() {
    // The first attempt is deferred (recorded); then the spool is full
    // when the second attempt delivers: the queue must not forget that
    // the disk still says pending, or a restart would send it again.
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::start(Behavior {
        close_421: Some(Fault::first(0)),
        ..Behavior::default()
    })
    .await;
    let spool = mtad::spool::MemorySpool::new();
    let cfg = config(
        dir.path(),
        "",
        &(delivery("1h", "5d") + &routes(&peer, dir.path())),
    );
    let node = common::node::start_on(cfg, std::sync::Arc::new(spool.clone())).await;
    assert!(send(&node, "a@example.test", &["x@dest.example"])
        .await
        .starts_with("250"));
    wait_for(&node, "the first attempt", |s| s.deferred == 1).await;
    spool.set_full(true);
    let all = mtad::queue::ops::Selector {
        all: true,
        ..Default::default()
    };
    let flushed = node.queue().act(mtad::queue::ops::Op::Flush, all).await;
    assert_eq!(flushed, Some(Ok(1)));
    wait_for(&node, "the delivery", |s| s.delivered == 1).await;
    assert_eq!(peer.messages().len(), 1);
    assert_eq!(
        spool.envelopes().len(),
        1,
        "not recorded: the spool is full"
    );
    spool.set_full(false);
    let deadline = tokio::time::Instant::now() + common::node::PATIENCE;
    while !spool.envelopes().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never recorded");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    node.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_watchdog_probe_fails_while_the_spool_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let spool = mtad::spool::MemorySpool::new();
    let route = format!(
        "[[route]]\ndomains = [\"*\"]\ndrop_dir = \"{}\"\n",
        dir.path().join("outbox").display()
    );
    let cfg = config(dir.path(), "", &route);
    let node = common::node::start_on(cfg, std::sync::Arc::new(spool.clone())).await;
    let health = node.health();
    let long = std::time::Duration::from_secs(30);
    assert_eq!(health.probe(long).await, Ok(()));
    // A write or fsync that never returns: the queue still answers, but
    // systemd must not be told all is well.
    spool.hang(true);
    let why = health
        .probe(std::time::Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(why.contains("spool"), "{why}");
    spool.hang(false);
    assert_eq!(health.probe(long).await, Ok(()));
    node.shutdown(std::time::Duration::from_secs(5)).await;
}
