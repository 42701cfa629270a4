//! The Grafana dashboard in contrib/grafana/mtad.json asks only for
//! metrics a running node publishes: a one-node cluster with a group,
//! mail delivered, deferred and bounced through an association that then
//! closes, and every metric name in the dashboard's queries is found in
//! its /metrics.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::client::Client;
use common::daemon::{free_port, scrape, Daemon};
use common::node::PATIENCE;
use common::peer::{Behavior, Peer};

/// Every `mtad_…` metric the dashboard's queries name (a histogram by its
/// base name, as a scrape groups it).
fn dashboard_metrics() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/grafana/mtad.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("mtad_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name.trim_end_matches("_bucket").to_string());
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_asks_for_is_published() {
    let wanted = dashboard_metrics();
    assert!(wanted.len() >= 15, "{wanted:?}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.key"),
        "dashboard test secret, long enough",
    )
    .unwrap();
    let behavior = Behavior {
        rcpt_rules: vec![
            ("defer".into(), "451 4.2.0 later".into()),
            ("bounce".into(), "550 5.1.1 no such user".into()),
        ],
        ..Behavior::default()
    };
    let hop = Peer::start(behavior).await;
    let (smtp, admin, cluster) = (free_port(), free_port(), free_port());
    let vip = SocketAddr::from(([127, 0, 0, 101], free_port().port()));
    let text = format!(
        r#"
[node]
name = "dash"
data_dir = "{data}"

[smtp]
listen = ["{smtp}"]
hostname = "dash.example.test"
relay_networks = ["127.0.0.0/8"]

[delivery]
retry = ["1h"]
idle_timeout = "1s"

[[route]]
domains = ["*"]
next_hops = ["{hop}"]
tls = "none"

[cluster]
name = "dash"
listen = "{cluster}"
secret_file = "{key}"

[[group]]
name = "mta"
vip = "{vip_ip}"
provider = "loopback"
smtp_port = {vip_port}

[admin]
listen = "{admin}"

[log]
format = "json"
level = "info"
"#,
        data = dir.path().join("data").display(),
        hop = hop.addr,
        key = dir.path().join("cluster.key").display(),
        vip_ip = vip.ip(),
        vip_port = vip.port(),
    );
    let cfg = dir.path().join("dash.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut node = Daemon::start(&cfg).await;
    node.wait_line(|l| l.contains("delivery gate open")).await;
    let mut c = Client::connect(smtp).await.unwrap();
    let to = [
        "ok@dest.example",
        "defer@dest.example",
        "bounce@dest.example",
    ];
    let reply = c
        .send("a@example.test", &to, "Subject: dash\r\n\r\nx\r\n")
        .await
        .unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    node.wait_line(|l| l.contains("association_closed")).await;

    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let m = scrape(admin).await;
        let have: BTreeSet<&str> = m.samples.iter().map(|s| s.metric.as_str()).collect();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|w| !have.contains(w.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dashboard asks for metrics no scrape has: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = node.child.start_kill();
    let _ = node.child.wait().await;
}
