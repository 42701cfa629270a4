use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::cluster::identity::Secret;
use crate::cluster::link::handshake::LinkEnd;
use crate::cluster::link::message::RefuseReason;
use crate::cluster::rpc::server::{self, Handler};
use crate::cluster::rpc::StatusReply;
use futures_util::future::BoxFuture;

pub(crate) const KEY: &[u8] = b"0123456789abcdef0123";
pub(crate) const LONG: Duration = Duration::from_secs(10);

pub(crate) fn cfg_with(name: &str, incarnation: u64, key: &[u8]) -> LinkConfig {
    LinkConfig {
        identity: Identity {
            name: name.into(),
            incarnation,
        },
        secrets: Secret::new(key).unwrap().into(),
        cluster: "test".into(),
        handshake_timeout: Duration::from_secs(5),
        transport: crate::cluster::link::transport::Tcp::shared(),
    }
}

pub(crate) fn cfg(name: &str, incarnation: u64) -> LinkConfig {
    cfg_with(name, incarnation, KEY)
}

/// Answers Status with the caller's own name, so tests see who called.
pub(crate) struct Echo;

impl Handler for Echo {
    fn handle(&self, from: Identity, req: Request) -> BoxFuture<'static, Reply> {
        Box::pin(async move {
            match req {
                Request::Status => Reply::Status(StatusReply {
                    name: from.name,
                    incarnation: from.incarnation,
                    initialized: false,
                    leader: None,
                }),
                _ => Reply::Unavailable("echo".into()),
            }
        })
    }
}

/// Serves `handler` on `listener` until the returned token is cancelled.
pub(crate) fn serve_on(
    listener: TcpListener,
    cfg: LinkConfig,
    handler: Arc<dyn Handler>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let task = tokio::spawn(server::serve(listener, cfg, handler, cancel.clone()));
    (cancel, task)
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

fn status_name(r: Result<Reply, CallError>) -> String {
    match r {
        Ok(Reply::Status(s)) => s.name,
        other => panic!("expected a status, got {other:?}"),
    }
}

#[tokio::test]
async fn calls_are_answered_over_one_link() {
    let (l, addr) = listener().await;
    let (cancel, task) = serve_on(l, cfg("srv", 2), Arc::new(Echo));
    let client = PeerClient::new(addr, cfg("cli", 1), Some(2));
    assert_eq!(status_name(client.call(Request::Status, LONG).await), "cli");
    // Many calls at once share the link and each gets its own reply.
    let calls = (0..20).map(|_| {
        let c = client.clone();
        tokio::spawn(async move { c.call(Request::Status, LONG).await })
    });
    for c in calls {
        assert_eq!(status_name(c.await.unwrap()), "cli");
    }
    assert_eq!(client.links_opened(), 1);
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn dead_peer_fails_fast_and_is_reached_once_it_is_up() {
    let (l, addr) = listener().await;
    drop(l);
    let client = PeerClient::new(addr, cfg("cli", 1), None);
    // Refused at once (unreachable), not timed out after LONG.
    let err = client.call(Request::Status, LONG).await.unwrap_err();
    assert!(err.is_unreachable(), "{err}");
    // Within the backoff, a short call does not even try to connect.
    let err = client
        .call(Request::Status, Duration::from_millis(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::BackingOff { .. } | CallError::TimedOut { .. }
        ),
        "{err}"
    );

    // The peer comes up at the same address: no restart of anything.
    let l = TcpListener::bind(addr).await.unwrap();
    let (cancel, task) = serve_on(l, cfg("srv", 2), Arc::new(Echo));
    assert_eq!(status_name(client.call(Request::Status, LONG).await), "cli");
    cancel.cancel();
    task.await.unwrap();
}

/// Answers the first `answer` calls of the first link, then drops it;
/// answers everything on later links. Returns how many links it accepted.
async fn flaky_server(l: TcpListener, answer: usize, cfg: LinkConfig) -> usize {
    let mut links = 0;
    loop {
        let (stream, from) = l.accept().await.unwrap();
        let mut link = link::accept(stream, from, &cfg).await.unwrap();
        links += 1;
        let mut answered = 0;
        loop {
            let Ok(v) = link.reader.recv().await else {
                return links;
            };
            let Envelope::Call { id, .. } = serde_json::from_value(v).unwrap() else {
                panic!("reply sent to server");
            };
            if links == 1 && answered == answer {
                // Drop the link with the call unanswered.
                break;
            }
            let reply = Reply::Unavailable(format!("link {links}"));
            let env = serde_json::to_value(Envelope::Reply { id, reply }).unwrap();
            link.writer.send(env).await.unwrap();
            answered += 1;
        }
    }
}

fn unavailable(r: Result<Reply, CallError>) -> String {
    match r {
        Ok(Reply::Unavailable(s)) => s,
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[tokio::test]
async fn link_lost_mid_call_fails_it_promptly_and_next_call_reconnects() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(flaky_server(l, 1, cfg("srv", 2)));
    let client = PeerClient::new(addr, cfg("cli", 1), Some(2));
    assert_eq!(
        unavailable(client.call(Request::Status, LONG).await),
        "link 1"
    );
    let t0 = Instant::now();
    let err = client.call(Request::Status, LONG).await.unwrap_err();
    assert!(matches!(err, CallError::LinkLost { .. }), "{err}");
    assert!(
        t0.elapsed() < LONG / 2,
        "failed only after {:?}",
        t0.elapsed()
    );
    assert_eq!(
        unavailable(client.call(Request::Status, LONG).await),
        "link 2"
    );
    assert_eq!(client.links_opened(), 2);
    drop(client);
    // Dropping the client closes its link, which ends the server.
    assert_eq!(server.await.unwrap(), 2);
}

#[tokio::test]
async fn a_timed_out_call_drops_the_link() {
    let (l, addr) = listener().await;
    let srv = cfg("srv", 2);
    let server = tokio::spawn(async move {
        let (stream, from) = l.accept().await.unwrap();
        let mut silent = link::accept(stream, from, &srv).await.unwrap();
        // Swallow the call; the client must give up and close the link.
        silent.reader.recv().await.unwrap();
        assert!(silent.reader.recv().await.is_err());
        // The next call arrives on a new link.
        let (stream, from) = l.accept().await.unwrap();
        let mut link = link::accept(stream, from, &srv).await.unwrap();
        let Envelope::Call { id, .. } =
            serde_json::from_value(link.reader.recv().await.unwrap()).unwrap()
        else {
            panic!("expected a call");
        };
        let reply = Reply::Unavailable("fresh".into());
        let env = serde_json::to_value(Envelope::Reply { id, reply }).unwrap();
        link.writer.send(env).await.unwrap();
        let _ = link.reader.recv().await;
    });
    let client = PeerClient::new(addr, cfg("cli", 1), Some(2));
    let err = client
        .call(Request::Status, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::TimedOut { .. }), "{err}");
    assert_eq!(
        unavailable(client.call(Request::Status, LONG).await),
        "fresh"
    );
    assert_eq!(client.links_opened(), 2);
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn wrong_secret_is_a_clear_error() {
    let (l, addr) = listener().await;
    let other = cfg_with("srv", 2, b"a different secret, same cluster");
    let (cancel, task) = serve_on(l, other, Arc::new(Echo));
    let client = PeerClient::new(addr, cfg("cli", 1), Some(2));
    let err = client.call(Request::Status, LONG).await.unwrap_err();
    assert!(err.is_unreachable());
    match &err {
        CallError::Connect {
            source: LinkError::Ended(LinkEnd::Refused(r) | LinkEnd::RefusedByPeer(r)),
            ..
        } => assert_eq!(*r, RefuseReason::BadProof, "{err}"),
        other => panic!("expected a refused handshake, got {other}"),
    }
    assert!(err.to_string().contains("secrets differ"), "{err}");
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn another_node_at_the_address_is_refused() {
    let (l, addr) = listener().await;
    let (cancel, task) = serve_on(l, cfg("srv", 3), Arc::new(Echo));
    let client = PeerClient::new(addr, cfg("cli", 1), Some(2));
    let err = client.call(Request::Status, LONG).await.unwrap_err();
    assert!(
        matches!(err, CallError::WrongPeer { expected: 2, .. }),
        "{err}"
    );
    cancel.cancel();
    task.await.unwrap();
}

#[test]
fn backoff_doubles_within_bounds() {
    for failures in 1..40 {
        let d = backoff(failures);
        assert!(
            d >= BACKOFF_MIN / 2 && d <= BACKOFF_MAX,
            "{failures}: {d:?}"
        );
    }
    assert!(backoff(1) <= BACKOFF_MIN);
    assert!(backoff(30) >= BACKOFF_MAX / 2);
}
