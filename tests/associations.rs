//! Outbound associations against a scripted peer over real loopback sockets.

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::peer::{Behavior, Fault, Peer};
use common::{Events, MemSpool};
use mtad::config::DeliveryConfig;
use mtad::delivery::tls::OutboundTls;
use mtad::delivery::{Destinations, Job, JobRcpt, JobResult, Outcome};
use mtad::spool::QueueId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Timeouts short enough for tests that wait for them to pass. Paused time
/// cannot be used with real sockets: on a current-thread runtime tokio
/// auto-advances the clock even when a socket event is pending, so read
/// deadlines fire spuriously.
fn fast() -> DeliveryConfig {
    DeliveryConfig {
        idle_timeout: Duration::from_millis(500),
        stall_timeout: Duration::from_secs(1),
        ..config()
    }
}

fn config() -> DeliveryConfig {
    DeliveryConfig {
        association_threshold: 50,
        max_associations: 20,
        max_messages_per_association: 1000,
        association_lifetime: Duration::from_secs(300),
        idle_timeout: Duration::from_secs(30),
        stall_timeout: Duration::from_secs(60),
        transaction_timeout: Duration::from_secs(600),
        connect_timeout: Duration::from_secs(10),
        retry: vec![Duration::from_secs(60)],
        max_queue_lifetime: Duration::from_secs(5 * 86400),
    }
}

struct Harness {
    dests: Destinations,
    results: mpsc::UnboundedReceiver<JobResult>,
    spool: Arc<MemSpool>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Harness {
    fn new(cfg: DeliveryConfig) -> Self {
        let spool = Arc::new(MemSpool::default());
        let (tx, results) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let dests = Destinations::new(
            tokio::sync::watch::channel(Arc::new(cfg)).1,
            "mtad.test".into(),
            Arc::new(spool.0.clone()),
            tx,
            cancel.clone(),
            tracker.clone(),
            mtad::delivery::gate::Gate::always(),
        );
        Self {
            dests,
            results,
            spool,
            cancel,
            tracker,
        }
    }

    /// Store message `n` and submit it for `hops` with `rcpts`.
    fn submit(&self, hops: &[SocketAddr], n: u64, rcpts: &[&str]) {
        self.submit_from(hops, None, n, rcpts);
    }

    /// Like `submit` (one recipient), for a message that expires at
    /// `expires_ms`.
    fn submit_expiring(&self, hops: &[SocketAddr], n: u64, expires_ms: u64) {
        self.submit_job(hops, None, n, &["a@dest.test"], expires_ms);
    }

    /// Like `submit`, from a given source address.
    fn submit_from(&self, hops: &[SocketAddr], source: Option<IpAddr>, n: u64, rcpts: &[&str]) {
        self.submit_job(hops, source, n, rcpts, 0);
    }

    fn submit_job(
        &self,
        hops: &[SocketAddr],
        source: Option<IpAddr>,
        n: u64,
        rcpts: &[&str],
        expires_ms: u64,
    ) {
        let id = QueueId(n);
        self.spool.put(
            id,
            format!("Subject: {n}\r\n\r\n.dot line\r\nmessage {n}\r\n"),
        );
        let recipients = rcpts
            .iter()
            .enumerate()
            .map(|(index, a)| JobRcpt {
                index,
                address: a.to_string(),
            })
            .collect();
        let job = Job {
            expires_ms,
            id,
            sender: "sender@src.test".into(),
            recipients,
        };
        self.dests.submit(0, hops, source, &OutboundTls::NONE, job);
    }

    /// The next `n` results, sorted by queue id.
    async fn results(&mut self, n: usize) -> Vec<JobResult> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.results.recv().await.expect("results channel open"));
        }
        v.sort_by_key(|r| r.id);
        v
    }

    async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn outcomes(r: &JobResult) -> Vec<Outcome> {
    r.results.iter().map(|x| x.outcome).collect()
}

/// Each message number the peer received, asserting none came twice.
fn delivered_once(peer: &Peer) -> HashSet<u64> {
    let mut seen = HashSet::new();
    for m in peer.messages() {
        let body = String::from_utf8(m.body).unwrap();
        assert!(
            body.contains("\r\n.dot line\r\n"),
            "dot-stuffing undone: {body:?}"
        );
        let n: u64 = body.lines().next().unwrap()["Subject: ".len()..]
            .parse()
            .unwrap();
        assert!(seen.insert(n), "message {n} delivered twice");
    }
    seen
}

#[tokio::test]
async fn backlog_opens_more_associations_up_to_max() {
    let peer = Peer::start(Behavior::default()).await;
    let events = Events::capture();
    let mut h = Harness::new(DeliveryConfig {
        max_associations: 3,
        ..config()
    });
    for n in 0..200 {
        h.submit(&[peer.addr], n, &["a@dest.test"]);
    }
    let results = h.results(200).await;
    assert!(results.iter().all(|r| outcomes(r) == [Outcome::Delivered]));
    assert!(results.iter().all(|r| r.next_hop == peer.addr.to_string()));
    assert_eq!(delivered_once(&peer).len(), 200);
    let stats = peer.stats();
    assert!(stats.connections >= 2, "{stats:?}");
    assert!(stats.max_open <= 3, "{stats:?}");
    assert_eq!(events.count("opened", "demand"), 1);
    assert!(events.count("opened", "threshold") >= 1);
    assert!(peer
        .messages()
        .iter()
        .all(|m| m.pipelined && m.mail_params.contains("SIZE=")));
    assert_eq!(h.dests.snapshot()[0].backlog, 0);
    h.shutdown().await;
}

#[tokio::test]
async fn recycles_after_max_messages() {
    let peer = Peer::start(Behavior::default()).await;
    let events = Events::capture();
    let mut h = Harness::new(DeliveryConfig {
        max_messages_per_association: 5,
        ..config()
    });
    for n in 0..12 {
        h.submit(&[peer.addr], n, &["a@dest.test"]);
    }
    let results = h.results(12).await;
    assert!(results.iter().all(|r| outcomes(r) == [Outcome::Delivered]));
    assert_eq!(delivered_once(&peer).len(), 12);
    let per_conn = |c| peer.messages().iter().filter(|m| m.conn == c).count();
    assert_eq!((per_conn(0), per_conn(1), per_conn(2)), (5, 5, 2));
    assert_eq!(peer.stats().connections, 3);
    assert_eq!(events.count("renegotiated", "count"), 2);
    assert_eq!(events.count("opened", "count"), 2);
    peer.wait(|s| s.quits >= 2).await;
    h.shutdown().await;
}

#[tokio::test]
async fn idle_association_closes_and_reuse_is_logged_once() {
    let peer = Peer::start(Behavior::default()).await;
    let events = Events::capture();
    let mut h = Harness::new(fast());
    h.submit(&[peer.addr], 1, &["a@dest.test"]);
    h.results(1).await;
    // Work arriving while the association idles: one reuse, not one per job.
    h.submit(&[peer.addr], 2, &["a@dest.test"]);
    h.submit(&[peer.addr], 3, &["a@dest.test"]);
    h.results(2).await;
    assert_eq!(events.count("reused", "demand"), 1);
    events.wait("closed", "idle", 1).await;
    let stats = peer.wait(|s| s.closed == 1).await;
    assert_eq!((stats.connections, stats.quits), (1, 1));
    // New work after the idle close opens a fresh association.
    h.submit(&[peer.addr], 4, &["a@dest.test"]);
    h.results(1).await;
    assert_eq!(peer.stats().connections, 2);
    assert_eq!(events.count("opened", "demand"), 2);
    h.shutdown().await;
    assert_eq!(events.count("closed", "shutdown"), 1);
    assert_eq!(peer.wait(|s| s.closed == 2).await.quits, 2);
}

#[tokio::test]
async fn stall_tears_down_requeues_and_delivers_through_a_new_association() {
    let peer = Peer::start(Behavior {
        stall_final: Some(Fault::first(1)),
        ..Behavior::default()
    })
    .await;
    let events = Events::capture();
    let mut h = Harness::new(fast());
    for n in 0..3 {
        h.submit(&[peer.addr], n, &["a@dest.test"]);
    }
    let results = h.results(3).await;
    assert!(
        results.iter().all(|r| outcomes(r) == [Outcome::Delivered]),
        "{results:?}"
    );
    assert_eq!(delivered_once(&peer).len(), 3);
    let conns: Vec<_> = peer.messages().iter().map(|m| m.conn).collect();
    assert_eq!(conns, vec![0, 1, 1]);
    assert_eq!(events.count("closed", "stall"), 1);
    assert_eq!(events.count("opened", "stall"), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn a_next_hop_that_dribbles_its_replies_is_given_up_on_at_the_transaction_timeout() {
    // Never silent long enough to stall; far too slow to finish in time.
    let peer = Peer::start(Behavior {
        dribble: Some((Fault::always(0), Duration::from_millis(100))),
        ..Behavior::default()
    })
    .await;
    let events = Events::capture();
    let mut h = Harness::new(DeliveryConfig {
        stall_timeout: Duration::from_secs(5),
        transaction_timeout: Duration::from_secs(1),
        ..config()
    });
    h.submit(&[peer.addr], 1, &["a@dest.test"]);
    let r = h.results(1).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Deferred]);
    let reply = &r[0].results[0].reply;
    assert!(reply.contains("took longer than 1s"), "{reply}");
    assert_eq!(peer.stats().messages, 0);
    assert_eq!(events.count("closed", "stall"), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn an_expired_job_is_never_sent() {
    let peer = Peer::start(Behavior::default()).await;
    let mut h = Harness::new(config());
    h.submit_expiring(&[peer.addr], 1, 1);
    h.submit(&[peer.addr], 2, &["a@dest.test"]);
    let r = h.results(2).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Deferred]);
    let reply = &r[0].results[0].reply;
    assert!(
        reply.contains("4.4.7") && reply.contains("expired"),
        "{reply}"
    );
    assert_eq!(outcomes(&r[1]), [Outcome::Delivered]);
    assert_eq!(delivered_once(&peer), HashSet::from([2]));
    h.shutdown().await;
}

#[tokio::test]
async fn silent_peer_stalls_each_message_at_most_twice() {
    let peer = Peer::start(Behavior {
        stall: Some(Fault::always(0)),
        ..Behavior::default()
    })
    .await;
    let events = Events::capture();
    let mut h = Harness::new(fast());
    h.submit(&[peer.addr], 1, &["a@dest.test"]);
    let r = h.results(1).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Deferred]);
    assert!(r[0].results[0].reply.contains("stalled"), "{r:?}");
    assert_eq!(events.count("closed", "stall"), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn tempfail_gives_deferred() {
    let peer = Peer::start(Behavior {
        rcpt_rules: vec![("grey".into(), "451 4.7.1 greylisted".into())],
        ..Behavior::default()
    })
    .await;
    let mut h = Harness::new(config());
    h.submit(&[peer.addr], 1, &["grey@dest.test", "ok@dest.test"]);
    let r = h.results(1).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Deferred, Outcome::Delivered]);
    assert_eq!(r[0].results[0].reply, "451 4.7.1 greylisted");
    assert_eq!(r[0].results[1].reply, "250 2.0.0 Ok: queued");

    let peer = Peer::start(Behavior {
        final_reply: Some("451 4.3.0 disk full".into()),
        ..Behavior::default()
    })
    .await;
    h.submit(&[peer.addr], 2, &["a@dest.test"]);
    let r = h.results(1).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Deferred]);
    assert_eq!(r[0].results[0].reply, "451 4.3.0 disk full");
    h.shutdown().await;
}

#[tokio::test]
async fn permfail_gives_failed() {
    let peer = Peer::start(Behavior {
        pipelining: false,
        ..Behavior::rcpt_reply("550 5.1.1 no such user")
    })
    .await;
    let mut h = Harness::new(config());
    h.submit(&[peer.addr], 1, &["x@dest.test", "y@dest.test"]);
    let r = h.results(1).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Failed, Outcome::Failed]);
    assert_eq!(r[0].results[1].reply, "550 5.1.1 no such user");
    // The association stays usable: the next message goes through RSET.
    h.submit(&[peer.addr], 2, &["z@dest.test"]);
    let r = h.results(1).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Failed]);
    assert_eq!(peer.stats().connections, 1);
    h.shutdown().await;
}

#[tokio::test]
async fn service_closing_defers_and_opens_a_new_association() {
    let peer = Peer::start(Behavior {
        close_421: Some(Fault::first(1)),
        ..Behavior::default()
    })
    .await;
    let events = Events::capture();
    let mut h = Harness::new(config());
    for n in 0..3 {
        h.submit(&[peer.addr], n, &["a@dest.test"]);
    }
    let r = h.results(3).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Delivered]);
    assert_eq!(outcomes(&r[1]), [Outcome::Deferred]);
    assert_eq!(r[1].results[0].reply, "421 4.3.2 peer.test closing");
    assert_eq!(outcomes(&r[2]), [Outcome::Delivered]);
    assert_eq!(peer.stats().connections, 2);
    assert_eq!(events.count("closed", "error"), 1);
    assert_eq!(events.count("opened", "error"), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn connection_refused_defers_everything_with_a_clear_reply() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let events = Events::capture();
    let mut h = Harness::new(config());
    for n in 0..3 {
        h.submit(&[dead], n, &["a@dest.test"]);
    }
    let r = h.results(3).await;
    let want = format!("451 4.4.1 connect to {dead} failed: Connection refused");
    for x in &r {
        assert_eq!(outcomes(x), [Outcome::Deferred]);
        assert_eq!(x.results[0].reply, want);
    }
    assert_eq!(events.count("closed", "error"), 1);
    assert_eq!(h.dests.snapshot()[0].associations, 0);
    h.shutdown().await;
}

#[tokio::test]
async fn falls_back_to_the_next_hop() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let peer = Peer::start(Behavior::default()).await;
    let mut h = Harness::new(config());
    h.submit(&[dead, peer.addr], 1, &["a@dest.test"]);
    let r = h.results(1).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Delivered]);
    assert_eq!(r[0].next_hop, peer.addr.to_string());
    h.shutdown().await;
}

#[tokio::test]
async fn refused_transactions_for_stall_timeout_renegotiate() {
    let peer = Peer::start(Behavior {
        mail_reply: Some("451 4.3.0 wrong address space".into()),
        ..Behavior::default()
    })
    .await;
    let events = Events::capture();
    let mut h = Harness::new(DeliveryConfig {
        idle_timeout: Duration::from_secs(600),
        ..fast()
    });
    h.submit(&[peer.addr], 1, &["a@dest.test"]);
    let r = h.results(1).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Deferred]);
    assert_eq!(r[0].results[0].reply, "451 4.3.0 wrong address space");
    // The thing under test is time passing with nothing but refusals.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.submit(&[peer.addr], 2, &["a@dest.test"]);
    h.results(1).await;
    assert_eq!(events.count("closed", "stall"), 1);
    assert_eq!(events.count("opened", "stall"), 1);
    assert_eq!(peer.stats().connections, 2);
    h.shutdown().await;
}

#[tokio::test]
async fn unreadable_message_is_deferred() {
    let peer = Peer::start(Behavior::default()).await;
    let mut h = Harness::new(config());
    let job = Job {
        expires_ms: 0,
        id: QueueId(99),
        sender: String::new(),
        recipients: vec![JobRcpt {
            index: 0,
            address: "a@dest.test".into(),
        }],
    };
    h.dests
        .submit(0, &[peer.addr], None, &OutboundTls::NONE, job);
    let r = h.results(1).await;
    assert_eq!(outcomes(&r[0]), [Outcome::Deferred]);
    assert!(r[0].results[0].reply.starts_with("451 4.3.0 "), "{r:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn associations_leave_from_the_source_address() {
    let peer = Peer::start(Behavior::default()).await;
    let mut h = Harness::new(config());
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    h.submit_from(&[peer.addr], Some(source), 1, &["a@dest.test"]);
    h.submit(&[peer.addr], 2, &["a@dest.test"]);
    let r = h.results(2).await;
    assert!(r.iter().all(|r| outcomes(r) == [Outcome::Delivered]));
    let mut clients: Vec<_> = peer.messages().iter().map(|m| m.client.ip()).collect();
    clients.sort();
    assert_eq!(clients, vec![IpAddr::V4(Ipv4Addr::LOCALHOST), source]);
    assert_eq!(
        h.dests.snapshot().len(),
        2,
        "a source address makes a destination"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn shutdown_finishes_the_transaction_in_hand() {
    let peer = Peer::start(Behavior::default()).await;
    let events = Events::capture();
    let mut h = Harness::new(config());
    for n in 0..20 {
        h.submit(&[peer.addr], n, &["a@dest.test"]);
    }
    h.results(1).await;
    h.cancel.cancel();
    h.tracker.close();
    h.tracker.wait().await;
    let stats = peer.wait(|s| s.closed == 1).await;
    assert_eq!(stats.quits, 1);
    assert_eq!(events.count("closed", "shutdown"), 1);
    // Every message the peer took was reported, none twice; the rest stay
    // in the spool without a result.
    let mut reported = 1;
    while let Ok(r) = h.results.try_recv() {
        assert_eq!(outcomes(&r), [Outcome::Delivered]);
        reported += 1;
    }
    assert_eq!(reported, delivered_once(&peer).len());
    assert!(reported < 20);
}

#[tokio::test]
async fn withdrawing_the_source_cuts_its_associations_mid_transaction() {
    // The second message's content is taken and never answered: the
    // association is mid-transaction when its source address goes away.
    let peer = Peer::start(Behavior {
        stall_final: Some(Fault::first(1)),
        ..Behavior::default()
    })
    .await;
    let events = Events::capture();
    let mut h = Harness::new(config());
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    for n in 0..3 {
        h.submit_from(&[peer.addr], Some(source), n, &["a@dest.test"]);
    }
    peer.wait(|s| s.held == 1).await;
    h.dests.withdraw(source);
    let results = h.results(3).await;
    assert_eq!(
        outcomes(&results[0]),
        [Outcome::Delivered],
        "before the cut"
    );
    // The job in hand and the one waiting come back deferred: the address
    // they would leave from is another node's now.
    let replies: Vec<&str> = results[1..]
        .iter()
        .map(|r| r.results[0].reply.as_str())
        .collect();
    assert!(
        results[1..]
            .iter()
            .all(|r| outcomes(r) == [Outcome::Deferred]),
        "{results:?}"
    );
    assert!(
        replies[0].contains("source address was withdrawn"),
        "{replies:?}"
    );
    assert!(replies[1].contains("moved to another node"), "{replies:?}");
    events.wait("closed", "withdrawn", 1).await;
    peer.wait(|s| s.closed == 1).await;
    assert_eq!(
        delivered_once(&peer),
        HashSet::from([0]),
        "nothing more went out"
    );
    assert!(h.dests.snapshot().is_empty(), "the destination is gone");
    h.shutdown().await;
}
