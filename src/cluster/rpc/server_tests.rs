use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::*;
use crate::cluster::rpc::peer::tests::{cfg, serve_on, Echo, LONG};
use crate::cluster::rpc::peer::{CallError, PeerClient};
use crate::cluster::rpc::{JoinReply, JoinRequest};
use crate::cluster::state::Role;

/// Holds every Join until released; answers Status at once.
struct SlowJoin {
    release: Arc<Notify>,
    started: Arc<Notify>,
}

impl Handler for SlowJoin {
    fn handle(&self, from: Identity, req: Request) -> BoxFuture<'static, Reply> {
        let (release, started) = (self.release.clone(), self.started.clone());
        Box::pin(async move {
            match req {
                Request::Join(_) => {
                    started.notify_one();
                    release.notified().await;
                    Reply::Join(JoinReply::Admitted { voter: true })
                }
                other => Echo.handle(from, other).await,
            }
        })
    }
}

fn join() -> Request {
    Request::Join(JoinRequest {
        name: "cli".into(),
        incarnation: 1,
        addr: "127.0.0.1:7400".parse().unwrap(),
        role: Role::Member,
        generation: 0,
        start: 0,
    })
}

#[tokio::test]
async fn a_slow_call_does_not_hold_up_others_on_the_link() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (release, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = SlowJoin {
        release: release.clone(),
        started: started.clone(),
    };
    let (cancel, task) = serve_on(l, cfg("srv", 2), Arc::new(handler));
    let client = PeerClient::new(addr, cfg("cli", 1), Some(2));
    let slow = {
        let c = client.clone();
        tokio::spawn(async move { c.call(join(), LONG).await })
    };
    started.notified().await;
    for _ in 0..5 {
        assert!(matches!(
            client.call(Request::Status, LONG).await,
            Ok(Reply::Status(_))
        ));
    }
    assert!(!slow.is_finished());
    release.notify_one();
    assert!(matches!(
        slow.await.unwrap(),
        Ok(Reply::Join(JoinReply::Admitted { voter: true }))
    ));
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_silent_connection_does_not_block_accepting() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (cancel, task) = serve_on(l, cfg("srv", 2), Arc::new(Echo));
    // Connects and never says anything (its handshake would time out).
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // And one that sends garbage.
    let mut junk = tokio::net::TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"EHLO me\r\n").await.unwrap();
    let client = PeerClient::new(addr, cfg("cli", 1), Some(2));
    assert!(matches!(
        client.call(Request::Status, LONG).await,
        Ok(Reply::Status(_))
    ));
    silent.flush().await.unwrap();
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn connections_waiting_for_a_handshake_are_capped() {
    use tokio::io::AsyncReadExt;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let pending = Arc::new(Semaphore::new(2));
    let task = tokio::spawn(serve_capped(
        l,
        cfg("srv", 2),
        Arc::new(Echo),
        cancel.clone(),
        pending.clone(),
    ));
    // Two silent connections: each gets the server's Hello (accepted, a
    // handshake waiting), and holds a slot.
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 512];
        assert!(s.read(&mut buf).await.unwrap() > 0, "the server's Hello");
        silent.push(s);
    }
    // A third is closed unanswered, however it behaves.
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 512];
    assert!(matches!(third.read(&mut buf).await, Ok(0) | Err(_)));
    // A silent one leaves: its slot is free again (awaited here by
    // taking it and giving it back) for a member.
    drop(silent.pop());
    drop(pending.acquire().await.unwrap());
    let client = PeerClient::new(addr, cfg("cli", 1), Some(2));
    assert!(matches!(
        client.call(Request::Status, LONG).await,
        Ok(Reply::Status(_))
    ));
    // An established link no longer holds a slot: another member too.
    assert_eq!(pending.available_permits(), 1);
    let other = PeerClient::new(addr, cfg("oth", 3), Some(2));
    assert!(matches!(
        other.call(Request::Status, LONG).await,
        Ok(Reply::Status(_))
    ));
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_closes_links_and_fails_calls_in_flight() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (release, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = SlowJoin {
        release,
        started: started.clone(),
    };
    let (cancel, task) = serve_on(l, cfg("srv", 2), Arc::new(handler));
    let client = PeerClient::new(addr, cfg("cli", 1), Some(2));
    let slow = {
        let c = client.clone();
        tokio::spawn(async move { c.call(join(), LONG).await })
    };
    started.notified().await;
    cancel.cancel();
    task.await.unwrap();
    // Lost with the link at once, not timed out after LONG.
    let err = slow.await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::LinkLost { .. }), "{err}");
    // Nobody listens any more.
    let err = client.call(Request::Status, LONG).await.unwrap_err();
    assert!(err.is_unreachable(), "{err}");
}

#[tokio::test]
async fn a_slow_call_timing_out_on_a_working_link_keeps_the_link() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (release, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = SlowJoin {
        release: release.clone(),
        started: started.clone(),
    };
    let (cancel, task) = serve_on(l, cfg("srv", 2), Arc::new(handler));
    let client = PeerClient::new(addr, cfg("cli", 1), Some(2));
    let slow = {
        let c = client.clone();
        tokio::spawn(async move { c.call(join(), Duration::from_millis(300)).await })
    };
    started.notified().await;
    // Another call is answered while the join waits: the link is alive.
    assert!(matches!(
        client.call(Request::Status, LONG).await,
        Ok(Reply::Status(_))
    ));
    let err = slow.await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::TimedOut { .. }), "{err}");
    assert!(matches!(
        client.call(Request::Status, LONG).await,
        Ok(Reply::Status(_))
    ));
    assert_eq!(client.links_opened(), 1, "the working link was kept");
    release.notify_one();
    cancel.cancel();
    task.await.unwrap();
}
