use tokio::io::AsyncReadExt;

use super::*;
use crate::smtp::Incoming;
use crate::spool::QueueId;

struct Count(std::sync::atomic::AtomicU64);

impl Accept for Count {
    fn accept(&self, _m: Incoming) -> crate::spool::SpoolFuture<'_, QueueId> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move { Ok(QueueId(n + 1)) })
    }
}

fn cfg() -> Arc<SmtpConfig> {
    Arc::new(SmtpConfig {
        listen: vec![],
        hostname: "vip.example.test".into(),
        backlog: 64,
        max_connections: 10,
        max_message_size: 10_000,
        receive_memory: 1 << 30,
        max_recipients: 10,
        max_commands_before_mail: 10,
        idle_timeout: Duration::from_secs(30),
        relay_networks: vec!["127.0.0.0/8".parse().unwrap()],
        accept_domains: vec![],
        tls: None,
        limits: Default::default(),
        auth: None,
    })
}

/// A port below the ephemeral range (32768–60999), so no client socket of
/// a parallel test can take it before the listener binds it.
fn free() -> SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    loop {
        let port = 19_000 + NEXT.fetch_add(1, Ordering::Relaxed) % 1_000;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
}

fn listener(addr: SocketAddr, drain: Duration) -> SmtpListener {
    SmtpListener::new(
        addr,
        (tokio::sync::watch::channel(cfg()).1, Default::default()),
        Arc::new(Count(0.into())),
        drain,
    )
}

async fn line(r: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).await.unwrap();
    l
}

/// Connect until the greeting is the drain's 421 (a connection that raced
/// the drain gets a normal session: it is ended and tried again); the
/// turned-away connection, its greeting read.
async fn turned_away(addr: SocketAddr) -> BufReader<TcpStream> {
    loop {
        let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
        let greet = line(&mut c).await;
        if greet.starts_with("421") {
            assert!(greet.contains("moving"), "{greet}");
            return c;
        }
        c.get_mut().write_all(b"QUIT\r\n").await.unwrap();
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn it_serves_until_stopped_and_binds_exclusively() {
    let addr = free();
    let l = listener(addr, Duration::from_secs(5));
    assert_eq!(l.check().await, Err("not listening".into()));
    l.start().await.unwrap();
    l.check().await.unwrap();
    // Nobody else can serve the same address meanwhile.
    let other = listener(addr, Duration::from_secs(5));
    let err = other.start().await.unwrap_err();
    assert!(err.contains("cannot listen"), "{err}");
    l.stop().await.unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "closed");
    // And then the other can.
    other.start().await.unwrap();
    other.check().await.unwrap();
    other.stop().await.unwrap();
}

#[tokio::test]
async fn a_drain_turns_new_clients_away_and_waits_for_open_sessions() {
    let addr = free();
    // A drain time no test waits out: only the session's end ends the stop.
    let l = listener(addr, Duration::from_secs(3600));
    l.start().await.unwrap();
    let mut open = BufReader::new(TcpStream::connect(addr).await.unwrap());
    assert!(line(&mut open).await.starts_with("220"));
    let stopping = tokio::spawn(l.drain());
    // New clients hear that the service moves.
    let mut late = turned_away(addr).await;
    let mut rest = Vec::new();
    let _ = late.read_to_end(&mut rest).await;
    assert!(
        !stopping.is_finished(),
        "the stop waits for the open session"
    );
    // The open session still completes a transaction, then leaves.
    open.get_mut()
        .write_all(b"HELO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n")
        .await
        .unwrap();
    for want in ["250", "250", "250", "354"] {
        let l = line(&mut open).await;
        assert!(l.starts_with(want), "{l}");
    }
    open.get_mut()
        .write_all(b"hi\r\n.\r\nQUIT\r\n")
        .await
        .unwrap();
    assert!(line(&mut open).await.starts_with("250"));
    assert!(line(&mut open).await.starts_with("221"));
    drop(open);
    // The stop ends once the session has (the bound only keeps a broken
    // stop from hanging the suite; the drain time is an hour).
    tokio::time::timeout(Duration::from_secs(60), stopping)
        .await
        .expect("drained after the last session")
        .unwrap()
        .unwrap();
    l.stop().await.unwrap();
}

#[tokio::test]
async fn a_hurried_drain_ends_with_sessions_still_open() {
    let addr = free();
    let l = listener(addr, Duration::from_secs(3600));
    l.start().await.unwrap();
    let mut open = BufReader::new(TcpStream::connect(addr).await.unwrap());
    assert!(line(&mut open).await.starts_with("220"));
    let stopping = tokio::spawn(l.drain());
    // Draining: new clients are turned away...
    turned_away(addr).await;
    assert!(!stopping.is_finished());
    // ...and then the lease gets short: the open session is cut.
    l.hurry();
    tokio::time::timeout(Duration::from_secs(60), stopping)
        .await
        .expect("a hurried drain does not wait out the drain time")
        .unwrap()
        .unwrap();
    l.stop().await.unwrap();
    let rest = line(&mut open).await;
    assert!(rest.is_empty() || rest.starts_with("421"), "{rest}");
}

#[tokio::test]
async fn a_stop_cuts_open_sessions_without_waiting_for_them() {
    let addr = free();
    let l = listener(addr, Duration::from_secs(3600));
    l.start().await.unwrap();
    // A client in the middle of DATA that then neither sends nor reads:
    // a session waiting for it to leave would hold the stop for seconds.
    let mut open = BufReader::new(TcpStream::connect(addr).await.unwrap());
    assert!(line(&mut open).await.starts_with("220"));
    open.get_mut()
        .write_all(b"HELO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n")
        .await
        .unwrap();
    for want in ["250", "250", "250", "354"] {
        let l = line(&mut open).await;
        assert!(l.starts_with(want), "{l}");
    }
    open.get_mut().write_all(b"half a body").await.unwrap();
    // Paused time: the stop must end without any time passing, while
    // the session's own close waits on the client.
    tokio::time::pause();
    let stopped = tokio::time::timeout(Duration::from_millis(1), l.stop()).await;
    tokio::time::resume();
    assert_eq!(stopped, Ok(Ok(())), "the stop waited for the session");
    let rest = line(&mut open).await;
    assert!(rest.starts_with("421"), "{rest}");
}
