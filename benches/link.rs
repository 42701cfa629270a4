//! Cost of sealing cluster links, on 127.0.0.1: how long a link takes to
//! set up (TCP connect, Hellos, X25519, proofs), and how many messages a
//! link carries per second sealed, against the same messages framed in
//! plaintext over a bare TCP stream (what link version 1 sent) in the
//! same run. Run with `cargo bench --bench link`; results go to
//! BENCHMARKS.md.

use std::sync::Arc;
use std::time::Duration;

use mtad::cluster::identity::{Identity, Secret};
use mtad::cluster::link::frame::{encode, FrameDecoder};
use mtad::cluster::link::message::LinkMessage;
use mtad::cluster::link::transport::Tcp;
use mtad::cluster::link::{accept, connect, LinkConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HANDSHAKES: usize = 300;
const MESSAGES: usize = 20_000;

fn cfg(name: &str, incarnation: u64) -> LinkConfig {
    LinkConfig {
        identity: Identity {
            name: name.into(),
            incarnation,
        },
        secrets: Secret::new(b"a benchmark secret, long enough")
            .unwrap()
            .into(),
        cluster: "bench".into(),
        handshake_timeout: Duration::from_secs(10),
        transport: Tcp::shared(),
    }
}

/// A message shaped like a raft append of `size` bytes of entries.
fn body(size: usize) -> Value {
    json!({"Call": {"id": 7, "request": {"AppendEntries": {
        "vote": {"term": 3, "node": 1}, "entries": "e".repeat(size)}}}})
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn handshakes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let b = cfg("node-b", 2);
        for _ in 0..HANDSHAKES {
            let (stream, from) = listener.accept().await.unwrap();
            let link = accept(stream, from, &b).await.unwrap();
            drop(link);
        }
    });
    let a = cfg("node-a", 1);
    let mut times = Vec::with_capacity(HANDSHAKES);
    for _ in 0..HANDSHAKES {
        let start = mtad::clock::instant();
        let link = connect(addr, &a).await.unwrap();
        times.push(start.elapsed());
        drop(link);
    }
    server.await.unwrap();
    times.sort();
    println!(
        "link set-up ({HANDSHAKES} sequential): median {:.0} µs, p99 {:.0} µs",
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6
    );
}

/// Messages per second through a sealed link, sender to receiver.
async fn sealed(size: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let (stream, from) = listener.accept().await.unwrap();
        let mut link = accept(stream, from, &cfg("node-b", 2)).await.unwrap();
        for _ in 0..MESSAGES {
            link.reader.recv().await.unwrap();
        }
    });
    let mut link = connect(addr, &cfg("node-a", 1)).await.unwrap();
    let msg = body(size);
    let start = mtad::clock::instant();
    for _ in 0..MESSAGES {
        link.writer.send(msg.clone()).await.unwrap();
    }
    receiver.await.unwrap();
    MESSAGES as f64 / start.elapsed().as_secs_f64()
}

/// The same messages, framed in plaintext on a bare TCP stream.
async fn plain(size: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut dec = FrameDecoder::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut got = 0;
        while got < MESSAGES {
            while let Some(LinkMessage::App { .. }) = dec.next_message::<LinkMessage>().unwrap() {
                got += 1;
            }
            if got < MESSAGES {
                let n = stream.read(&mut buf).await.unwrap();
                dec.feed(&buf[..n]);
            }
        }
    });
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let msg = Arc::new(body(size));
    let start = mtad::clock::instant();
    for _ in 0..MESSAGES {
        let frame = encode(&LinkMessage::App {
            body: (*msg).clone(),
        })
        .unwrap();
        stream.write_all(&frame).await.unwrap();
    }
    receiver.await.unwrap();
    MESSAGES as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --all-targets` runs bench targets too; only measure
    // when asked to by `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    tokio::runtime::Runtime::new().unwrap().block_on(measure());
}

async fn measure() {
    handshakes().await;
    println!("| message | plaintext msgs/s | sealed msgs/s | sealed / plaintext |");
    println!("|---|---|---|---|");
    for size in [200, 4096, 65536] {
        let p = plain(size).await;
        let s = sealed(size).await;
        println!("| {size} B | {p:.0} | {s:.0} | {:.2} |", s / p);
    }
}
