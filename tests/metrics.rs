//! `/metrics` scraped from a running `mtad run` and parsed as the
//! Prometheus text format: the counts match what was sent — delivered,
//! deferred and bounced recipients by destination, queue depth, SMTP
//! replies by class, spool commits — and histograms have buckets.

mod common;

use std::time::Duration;

use common::client::Client;
use common::daemon::{free_port, relay_config, sample, scrape, Daemon};
use common::peer::{Behavior, Peer};
use prometheus_parse::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let rules = vec![
        ("later".to_string(), "451 4.2.0 try later".to_string()),
        ("nobody".to_string(), "550 5.1.1 no such user".to_string()),
    ];
    let peer = Peer::start(Behavior {
        rcpt_rules: rules,
        ..Behavior::default()
    })
    .await;
    let (smtp, admin) = (free_port(), free_port());
    let _daemon = Daemon::start(&relay_config(dir.path(), "m", smtp, admin, peer.addr)).await;

    let mut c = Client::connect(smtp).await.unwrap();
    let mut send = async |to: &str| {
        let r = c
            .send("s@b.example", &[to], "Subject: m\r\n\r\nx\r\n")
            .await
            .unwrap();
        assert!(r.starts_with("250"), "{r}");
    };
    for _ in 0..5 {
        send("ok@a.example").await;
    }
    for _ in 0..3 {
        send("later@a.example").await;
    }
    send("nobody@a.example").await;
    // A command the server does not know: a 5xx reply, the session goes on.
    assert!(c.command("FROB\r\n").await.unwrap().starts_with("500"));

    let dest = peer.addr.to_string();
    let d = [("destination", dest.as_str())];
    let wait = async {
        loop {
            let s = scrape(admin).await;
            let done = sample(&s, "mtad_delivered_total", &d) == Some(5.0)
                && sample(&s, "mtad_deferred_total", &d) == Some(3.0)
                && sample(&s, "mtad_bounced_total", &d) == Some(1.0);
            if done {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let s = tokio::time::timeout(common::node::PATIENCE, wait)
        .await
        .expect("counts in time");
    // 9 accepted, plus the DSN for the bounce (made locally).
    assert_eq!(sample(&s, "mtad_received_total", &[]), Some(10.0));
    assert_eq!(
        sample(&s, "mtad_queue_messages", &d),
        Some(3.0),
        "the deferred wait"
    );
    assert!(sample(&s, "mtad_queue_oldest_seconds", &d).is_some());
    assert!(sample(&s, "mtad_smtp_replies_total", &[("class", "5xx")]) >= Some(1.0));
    assert!(sample(&s, "mtad_smtp_replies_total", &[("class", "2xx")]) >= Some(9.0));
    assert!(sample(&s, "mtad_smtp_sessions_open", &[]) >= Some(1.0));
    let opened = [("destination", dest.as_str()), ("reason", "demand")];
    assert_eq!(
        sample(&s, "mtad_associations_opened_total", &opened),
        Some(1.0)
    );
    assert_eq!(
        sample(&s, "mtad_associations_open", &d),
        Some(1.0),
        "persistent"
    );
    // Histograms come with buckets; every commit is counted in +Inf.
    let fsync = s
        .samples
        .iter()
        .find(|x| x.metric == "mtad_spool_fsync_seconds")
        .expect("fsync histogram");
    let Value::Histogram(buckets) = &fsync.value else {
        panic!("{:?}", fsync.value)
    };
    assert!(buckets.len() > 5, "{buckets:?}");
    assert!(buckets.last().unwrap().count >= 10.0, "{buckets:?}");
    assert!(
        s.docs.contains_key("mtad_queue_messages"),
        "gauges are documented"
    );
}
