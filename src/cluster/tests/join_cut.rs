//! A join cut at each step heals by retrying, with nobody restarted. A
//! proxy in front of the sponsor forwards whole frames and cuts one
//! chosen connection after a chosen number of frames from the sponsor.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Cut connection number `conn` (0-based, in accept order) after
/// forwarding `frames` frames from the sponsor to the joiner.
#[derive(Clone, Copy, Debug)]
struct Cut {
    conn: usize,
    frames: usize,
}

/// Start the proxy; returns its address and its count of connections.
async fn proxy(target: SocketAddr, cut: Cut) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let limit = if n == cut.conn {
                Some(cut.frames)
            } else {
                None
            };
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async { tokio::io::copy(&mut cr, &mut sw).await.ok() };
                let down = async {
                    let mut sent = 0;
                    loop {
                        if limit.is_some_and(|l| sent >= l) {
                            return;
                        }
                        let mut len = [0u8; 4];
                        if sr.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                        if sr.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        if cw.write_all(&len).await.is_err() || cw.write_all(&body).await.is_err() {
                            return;
                        }
                        sent += 1;
                    }
                };
                // Whichever side ends first ends the connection: dropping
                // both halves closes it in both directions.
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    (addr, seen)
}

async fn joins_despite(cut: Cut) {
    let h = Harness::new();
    let addrs: Vec<SocketAddr> = (0..4).map(|_| free_addr()).collect();
    let a = h.node("a", addrs[0], &addrs[..1]).await;
    voters(&a, 1).await;
    let (via, connections) = proxy(addrs[0], cut).await;
    let d = h.node("d", addrs[3], &[via]).await;
    let both = voters(&a, 2).await;
    assert!(both.contains(&d.identity.incarnation), "{cut:?}: {both:?}");
    assert_eq!(voters(&d, 2).await, both, "{cut:?}");
    // A clean join takes two connections (probe, join): the cut one
    // was really cut and the joiner came back on its own.
    assert!(
        connections.load(Ordering::SeqCst) > 2,
        "{cut:?}: no retry seen"
    );
    h.stop([a, d]).await;
}

// Connection 0 is the joiner's status probe, connection 1 its join call.
// Frames from the sponsor: 1 Hello, 2 Proof, 3 the reply.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_before_the_challenge() {
    joins_despite(Cut { conn: 0, frames: 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_after_the_challenge() {
    joins_despite(Cut { conn: 0, frames: 1 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_after_authentication_before_the_status_reply() {
    joins_despite(Cut { conn: 0, frames: 2 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_after_admission_before_the_joiner_hears() {
    joins_despite(Cut { conn: 1, frames: 2 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sponsor_restarted_mid_join_is_joined_after_it_returns() {
    let h = Harness::new();
    let addrs: Vec<SocketAddr> = (0..2).map(|_| free_addr()).collect();
    let a_stop = h.cancel.child_token();
    let a = h
        .node_as(
            "a",
            addrs[0],
            &addrs[..1],
            ClusterRole::Member,
            a_stop.clone(),
        )
        .await;
    voters(&a, 1).await;
    let a_id = a.identity.incarnation;
    // d starts joining; the sponsor goes down at once, wherever d is.
    let d = h.node("d", addrs[1], &addrs[..1]).await;
    a_stop.cancel();
    a.raft.shutdown().await.unwrap();
    // The sponsor returns with its data dir, same address: d gets in
    // without being restarted.
    let a = h
        .node_as(
            "a",
            addrs[0],
            &addrs[..1],
            ClusterRole::Member,
            h.cancel.child_token(),
        )
        .await;
    assert_eq!(a.identity.incarnation, a_id);
    let both = voters(&a, 2).await;
    assert!(both.contains(&d.identity.incarnation), "{both:?}");
    h.stop([a, d]).await;
}
