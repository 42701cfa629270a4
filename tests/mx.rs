//! MX routing against a real DNS server (Knot, on a loopback port) and
//! real SMTP peers on loopback addresses: preference order, failover to
//! the next MX (refused, or a 4xx), two domains of one site sharing an
//! association, the implicit MX, a CNAME'd MX host, IPv6, null MX and
//! NXDOMAIN bounces, a SERVFAIL that defers until DNS recovers, and an MX
//! that points back at the sending node.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::client::Client;
use common::daemon::{free_port, Daemon};
use common::knot::Knot;
use common::node::PATIENCE;
use common::peer::{Behavior, Peer};

/// The zone of the test domains (all under mx.test).
fn zone(me: &str) -> String {
    format!(
        "$ORIGIN mx.test.\n$TTL 60\n\
         @ SOA ns hostmaster 1 3600 600 86400 60\n@ NS ns\nns A 127.0.0.1\n\
         pref MX 10 mx1\npref MX 20 mx2\n\
         twin MX 20 mx2\ntwin MX 10 mx1\n\
         busy MX 10 mx3\nbusy MX 20 mx2\n\
         down MX 10 nowhere\ndown MX 20 mx2\n\
         implicit A 127.0.0.43\n\
         alias MX 10 named\nnamed CNAME mx1\n\
         six MX 10 v6\nv6 AAAA ::1\n\
         null MX 0 .\n\
         loop MX 10 self\nself A {me}\n\
         mx1 A 127.0.0.41\nmx2 A 127.0.0.42\nnowhere A 127.0.0.44\nmx3 A 127.0.0.45\n"
    )
}

/// The zone that fails first (SERVFAIL), then answers.
const LATER: &str = "$ORIGIN later.test.\n$TTL 60\n\
    @ SOA ns.mx.test. hostmaster.mx.test. 1 3600 600 86400 60\n@ NS ns.mx.test.\n\
    @ MX 10 mx1.mx.test.\n";

fn write_config(dir: &Path, smtp: SocketAddr, dns: SocketAddr, port: u16) -> PathBuf {
    let text = format!(
        r#"
[node]
name = "mx"
data_dir = "{data}"

[smtp]
listen = ["{smtp}"]
hostname = "mx-test.example"
relay_networks = ["127.0.0.0/8"]

[delivery]
retry = ["1s"]

[[route]]
domains = ["*"]
mx = true
mx_port = {port}
tls = "none"

[dns]
servers = ["{dns}"]

[log]
format = "json"
level = "info"
"#,
        data = dir.join("data").display(),
    );
    let path = dir.join("mtad.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn send(smtp: SocketAddr, to: &str, subject: &str) {
    let mut c = Client::connect(smtp).await.unwrap();
    let body = format!("Subject: {subject}\r\n\r\nvia MX\r\n");
    // The null sender: a bounce here makes no DSN to route.
    let reply = c.send("", &[to], &body).await.unwrap();
    assert!(reply.starts_with("250"), "{reply}");
}

/// The subjects `peer` received.
fn subjects(peer: &Peer) -> Vec<String> {
    peer.messages()
        .iter()
        .filter_map(|m| {
            let text = String::from_utf8_lossy(&m.body).to_string();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        })
        .collect()
}

async fn until_received(peer: &Peer, subject: &str) {
    tokio::time::timeout(PATIENCE, async {
        while !subjects(peer).iter().any(|s| s == subject) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{subject} never arrived at {}", peer.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_finds_its_way_by_mx_records() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = free_port();
    let dns = free_port();
    let knot = Knot::start(
        dir.path(),
        dns,
        &[
            ("mx.test", Some(&zone(&smtp.ip().to_string()))),
            ("later.test", None),
        ],
    );
    // Every MX host listens on one port, each on its own address; nothing
    // listens on 127.0.0.44 ("nowhere").
    let port = free_port().port();
    let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
    let mx1 = Peer::start_at(at([127, 0, 0, 41]), Behavior::default()).await;
    let mx2 = Peer::start_at(at([127, 0, 0, 42]), Behavior::default()).await;
    let implicit = Peer::start_at(at([127, 0, 0, 43]), Behavior::default()).await;
    let busy = Behavior {
        mail_reply: Some("451 4.3.2 too busy, try another MX".into()),
        ..Behavior::default()
    };
    let mx3 = Peer::start_at(at([127, 0, 0, 45]), busy).await;
    let six = Peer::start_at(
        SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], port)),
        Behavior::default(),
    )
    .await;
    let cfg = write_config(dir.path(), smtp, knot.addr, port);
    let mut mtad = Daemon::start(&cfg).await;

    // The lowest preference first.
    send(smtp, "a@pref.mx.test", "preferred").await;
    until_received(&mx1, "preferred").await;
    assert!(subjects(&mx2).is_empty());
    // Another domain with the same MX hosts is the same site: its mail
    // goes over the association already open.
    send(smtp, "a@twin.mx.test", "same site").await;
    until_received(&mx1, "same site").await;
    let conn = |s: &str| {
        let m = mx1.messages();
        let m = m
            .iter()
            .find(|m| String::from_utf8_lossy(&m.body).contains(s));
        m.unwrap().conn
    };
    assert_eq!(conn("Subject: same site"), conn("Subject: preferred"));
    // The best MX refuses connections, or answers 4xx: the next one
    // takes it.
    send(smtp, "a@down.mx.test", "next mx").await;
    until_received(&mx2, "next mx").await;
    send(smtp, "a@busy.mx.test", "after 4xx").await;
    until_received(&mx2, "after 4xx").await;
    assert!(subjects(&mx3).is_empty());
    // No MX: the domain's own address.
    send(smtp, "a@implicit.mx.test", "implicit").await;
    until_received(&implicit, "implicit").await;
    // An MX host that is a CNAME, and one with only an IPv6 address.
    send(smtp, "a@alias.mx.test", "cname").await;
    until_received(&mx1, "cname").await;
    send(smtp, "a@six.mx.test", "ipv6").await;
    until_received(&six, "ipv6").await;

    // Never deliverable: bounced at once, with the reason.
    send(smtp, "a@null.mx.test", "null").await;
    mtad.wait_line(|l| l.contains("bounced") && l.contains("556 5.1.10"))
        .await;
    send(smtp, "a@missing.mx.test", "nxdomain").await;
    mtad.wait_line(|l| l.contains("bounced") && l.contains("550 5.1.2"))
        .await;
    send(smtp, "a@loop.mx.test", "loop").await;
    mtad.wait_line(|l| l.contains("bounced") && l.contains("5.4.6"))
        .await;

    // DNS fails (SERVFAIL): deferred, then delivered once it answers.
    send(smtp, "a@later.test", "later").await;
    mtad.wait_line(|l| l.contains("deferred") && l.contains("4.4.3"))
        .await;
    knot.load("later.test", LATER);
    until_received(&mx1, "later").await;

    let all: Vec<String> = [&mx1, &mx2, &implicit, &six]
        .iter()
        .flat_map(|p| subjects(p))
        .collect();
    for never in ["null", "nxdomain", "loop"] {
        assert!(!all.iter().any(|s| s == never), "{never} was delivered");
    }
    let _ = mtad.child.start_kill();
    let _ = mtad.child.wait().await;
}
