use serde_json::json;
use tokio::io::{duplex, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cluster::identity::Secret;
use crate::cluster::link::transport::Tcp;

use super::*;

fn cfg(name: &str, incarnation: u64, cluster: &str, key: &[u8]) -> LinkConfig {
    LinkConfig {
        identity: Identity {
            name: name.into(),
            incarnation,
        },
        secrets: Secret::new(key).unwrap().into(),
        cluster: cluster.into(),
        handshake_timeout: Duration::from_secs(5),
        transport: Tcp::shared(),
    }
}

const KEY: &[u8] = b"0123456789abcdef0123";

fn node_a() -> LinkConfig {
    cfg("node-a", 1, "prod", KEY)
}

fn node_b() -> LinkConfig {
    cfg("node-b", 2, "prod", KEY)
}

/// Runs accept (on a real listener) and connect concurrently.
async fn tcp_pair(
    client: LinkConfig,
    server: LinkConfig,
) -> (Result<Link, LinkError>, Result<Link, LinkError>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (stream, from) = listener.accept().await.unwrap();
        accept(stream, from, &server).await
    });
    let c = connect(addr, &client).await;
    (c, server_side.await.unwrap())
}

fn ended(r: Result<Link, LinkError>) -> LinkEnd {
    match r {
        Err(LinkError::Ended(end)) => end,
        Err(e) => panic!("expected a specific end, got {e}"),
        Ok(l) => panic!("unexpectedly established with {:?}", l.peer),
    }
}

#[tokio::test]
async fn good_secret_connects_and_carries_messages() {
    let (c, s) = tcp_pair(node_a(), node_b()).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.peer, node_b().identity);
    assert_eq!(s.peer, node_a().identity);
    c.writer.send(json!({"vote": 1})).await.unwrap();
    s.writer.send(json!(["ack"])).await.unwrap();
    assert_eq!(s.reader.recv().await.unwrap(), json!({"vote": 1}));
    assert_eq!(c.reader.recv().await.unwrap(), json!(["ack"]));
    // A clean close is seen as such.
    drop(c);
    assert!(matches!(
        s.reader.recv().await,
        Err(LinkError::Ended(LinkEnd::PeerClosed))
    ));
}

#[tokio::test]
async fn wrong_secret_gives_both_sides_the_reason() {
    let (c, s) = tcp_pair(
        node_a(),
        cfg("node-b", 2, "prod", b"another secret, same length"),
    )
    .await;
    assert_eq!(ended(c), LinkEnd::Refused(RefuseReason::BadProof));
    assert_eq!(ended(s), LinkEnd::Refused(RefuseReason::BadProof));
}

#[tokio::test]
async fn wrong_cluster_gives_both_sides_the_reason() {
    let (c, s) = tcp_pair(node_a(), cfg("node-b", 2, "staging", KEY)).await;
    assert!(matches!(
        ended(c),
        LinkEnd::Refused(RefuseReason::WrongCluster { .. })
    ));
    assert!(matches!(
        ended(s),
        LinkEnd::Refused(RefuseReason::WrongCluster { .. })
    ));
}

#[tokio::test]
async fn self_connect_is_refused() {
    let (c, s) = tcp_pair(node_a(), node_a()).await;
    assert_eq!(ended(c), LinkEnd::Refused(RefuseReason::SelfConnect));
    assert_eq!(ended(s), LinkEnd::Refused(RefuseReason::SelfConnect));
}

#[tokio::test]
async fn silent_client_times_out_on_the_acceptor() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Connected but never speaks; kept open for the whole test.
    let _silent = TcpStream::connect(addr).await.unwrap();
    let (stream, from) = listener.accept().await.unwrap();
    let mut server = node_b();
    server.handshake_timeout = Duration::from_millis(200);
    assert_eq!(
        ended(accept(stream, from, &server).await),
        LinkEnd::Refused(RefuseReason::TimedOut)
    );
}

#[tokio::test]
async fn connect_to_closed_port_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    assert!(matches!(
        connect(addr, &node_a()).await,
        Err(LinkError::Connect { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn silent_peer_times_out_with_paused_time() {
    let (ours, _theirs) = duplex(1024);
    let start = Instant::now();
    let r = handshake(ours, Role::Initiator, &node_a()).await;
    assert_eq!(
        ended(r.map(|_| unreachable!())),
        LinkEnd::Refused(RefuseReason::TimedOut)
    );
    assert!(Instant::now() - start >= node_a().handshake_timeout);
}

async fn duplex_pair() -> (Link<tokio::io::DuplexStream>, Link<tokio::io::DuplexStream>) {
    let (x, y) = duplex(64 * 1024);
    let (ca, cb) = (node_a(), node_b());
    let (a, b) = tokio::join!(
        handshake(x, Role::Initiator, &ca),
        handshake(y, Role::Acceptor, &cb)
    );
    (a.unwrap(), b.unwrap())
}

#[tokio::test]
async fn message_sent_right_after_the_handshake_is_not_lost() {
    let (x, y) = duplex(64 * 1024);
    let b_cfg = node_b();
    let b_side = async move {
        let mut b = handshake(y, Role::Acceptor, &b_cfg).await.unwrap();
        // Bigger than the handshake frame cap, sent at once.
        let big = json!("x".repeat(MAX_HANDSHAKE_FRAME * 2));
        b.writer.send(big.clone()).await.unwrap();
        (b, big)
    };
    let a_cfg = node_a();
    let (a, (_b, big)) = tokio::join!(handshake(x, Role::Initiator, &a_cfg), b_side);
    assert_eq!(a.unwrap().reader.recv().await.unwrap(), big);
}

#[tokio::test]
async fn oversized_frame_from_authenticated_peer_is_refused() {
    let (mut a, mut b) = duplex_pair().await;
    // A buggy peer announces a 4 GiB frame; refused from the header.
    b.writer
        .inner
        .write_all(&u32::MAX.to_be_bytes())
        .await
        .unwrap();
    let err = a.reader.recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::Ended(LinkEnd::Refused(RefuseReason::ProtocolViolation { .. }))
        ),
        "{err}"
    );
    assert!(a.reader.dec.buffered() == 0);
    // Final: the reader does not come back to life.
    assert!(a.reader.recv().await.is_err());
}

#[tokio::test]
async fn garbage_and_handshake_messages_after_establishment_are_refused() {
    // From an authenticated but buggy peer: sealed, yet not what belongs.
    let frames: [&[u8]; 3] = [
        b"not json",
        br#"{"type":"hello","proto":2,"cluster":"prod","name":"x","incarnation":5,"nonce":"0000000000000000000000000000000000000000000000000000000000000000"}"#,
        br#"{"type":"mystery"}"#,
    ];
    for payload in frames {
        let (mut a, mut b) = duplex_pair().await;
        let frame = b.writer.seal.seal_payload(payload).unwrap();
        b.writer.inner.write_all(&frame).await.unwrap();
        assert!(matches!(
            a.reader.recv().await,
            Err(LinkError::Ended(LinkEnd::Refused(
                RefuseReason::ProtocolViolation { .. }
            )))
        ));
    }
}

#[tokio::test]
async fn injected_or_replayed_frames_are_refused_as_forged() {
    let app = br#"{"type":"app","body":{"vote":true}}"#;
    // Plaintext injected into the stream, by someone without the keys.
    let (mut a, mut b) = duplex_pair().await;
    let mut plain = (app.len() as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(app);
    b.writer.inner.write_all(&plain).await.unwrap();
    let err = a.reader.recv().await.unwrap_err();
    assert!(err.to_string().contains("failed authentication"), "{err}");

    // A genuine frame, delivered once, then replayed into the stream.
    let (mut a, mut b) = duplex_pair().await;
    let frame = b.writer.seal.seal_payload(app).unwrap();
    b.writer.inner.write_all(&frame).await.unwrap();
    assert_eq!(a.reader.recv().await.unwrap(), json!({"vote": true}));
    b.writer.inner.write_all(&frame).await.unwrap();
    let err = a.reader.recv().await.unwrap_err();
    assert!(err.to_string().contains("failed authentication"), "{err}");
    // Final: nothing after it is read.
    b.writer.send(json!(1)).await.unwrap();
    assert!(a.reader.recv().await.is_err());
}

#[tokio::test]
async fn truncated_frame_then_close_is_peer_closed() {
    let (mut a, mut b) = duplex_pair().await;
    b.writer
        .inner
        .write_all(&[0, 0, 0, 50, b'{'])
        .await
        .unwrap();
    drop(b);
    assert!(matches!(
        a.reader.recv().await,
        Err(LinkError::Ended(LinkEnd::PeerClosed))
    ));
}

#[tokio::test]
async fn refuse_reaches_the_peer_with_its_reason() {
    let (mut a, mut b) = duplex_pair().await;
    b.writer
        .refuse(RefuseReason::violation("bye"))
        .await
        .unwrap();
    assert!(matches!(
        b.writer.send(json!(1)).await,
        Err(LinkError::Broken)
    ));
    assert_eq!(
        a.reader.recv().await.unwrap_err().to_string(),
        "refused by peer: protocol violation: bye"
    );
}

#[tokio::test]
async fn links_carry_messages_while_the_secret_changes() {
    const NEW: &[u8] = b"the new cluster secret, long enough";
    // node-a already proves with the new secret and accepts the old;
    // node-b proves with the old one and accepts the new (step 2).
    let mut a = cfg("node-a", 1, "prod", NEW);
    a.secrets.accepted = vec![Secret::new(KEY).unwrap()];
    let mut b = node_b();
    b.secrets.accepted = vec![Secret::new(NEW).unwrap()];
    for (ini, acc) in [(a.clone(), b.clone()), (b, a)] {
        let (x, y) = duplex(64 * 1024);
        let (l, r) = tokio::join!(
            handshake(x, Role::Initiator, &ini),
            handshake(y, Role::Acceptor, &acc)
        );
        let (mut l, mut r) = (l.unwrap(), r.unwrap());
        l.writer.send(json!({"from": "initiator"})).await.unwrap();
        r.writer.send(json!({"from": "acceptor"})).await.unwrap();
        assert_eq!(r.reader.recv().await.unwrap(), json!({"from": "initiator"}));
        assert_eq!(l.reader.recv().await.unwrap(), json!({"from": "acceptor"}));
    }
}

#[tokio::test]
async fn a_skipped_rotation_step_reads_as_a_refusal_not_a_forgery() {
    const NEW: &[u8] = b"the new cluster secret, long enough";
    // node-a proves with the new secret and accepts the old; node-b was
    // never told about the new one. node-a verifies node-b's proof, but
    // node-b refuses node-a's — in the clear, having no keys.
    let mut a = cfg("node-a", 1, "prod", NEW);
    a.secrets.accepted = vec![Secret::new(KEY).unwrap()];
    let (x, y) = duplex(64 * 1024);
    let b = node_b();
    let (l, r) = tokio::join!(
        handshake(x, Role::Initiator, &a),
        handshake(y, Role::Acceptor, &b)
    );
    assert_eq!(
        ended(r.map(|_| unreachable!())),
        LinkEnd::Refused(RefuseReason::BadProof)
    );
    let err = l.unwrap().reader.recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::Ended(LinkEnd::RefusedByPeer(RefuseReason::BadProof))
        ),
        "{err}"
    );
}
