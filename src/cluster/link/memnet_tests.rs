use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::*;
use crate::cluster::rpc::peer::tests::{cfg, Echo, LONG};
use crate::cluster::rpc::peer::PeerClient;
use crate::cluster::rpc::server;
use crate::cluster::rpc::{Reply, Request};

fn ip(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::new(ip(n), 7400)
}

/// A connection from node 1 to a listener on node 2, both ends.
async fn pair(net: &MemNet) -> (Stream, Stream, Box<dyn Listener>) {
    let mut l = net.transport(ip(2)).listen(addr(2)).await.unwrap();
    let c = net.transport(ip(1)).connect(addr(2)).await.unwrap();
    let (s, from) = l.accept().await.unwrap();
    assert_eq!(from.ip(), ip(1));
    (c, s, l)
}

async fn read_n(s: &mut Stream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).await.unwrap();
    buf
}

#[tokio::test(start_paused = true)]
async fn bytes_flow_both_ways_and_a_close_is_seen() {
    let net = MemNet::new(1);
    let (mut c, mut s, _l) = pair(&net).await;
    c.write_all(b"ping").await.unwrap();
    assert_eq!(read_n(&mut s, 4).await, b"ping");
    s.write_all(b"pong").await.unwrap();
    assert_eq!(read_n(&mut c, 4).await, b"pong");
    drop(c);
    assert_eq!(s.read(&mut [0; 8]).await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn nobody_listening_is_refused_and_a_second_listener_is_in_use() {
    let net = MemNet::new(1);
    let err = net.transport(ip(1)).connect(addr(2)).await.err().unwrap();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    let _l = net.transport(ip(2)).listen(addr(2)).await.unwrap();
    let again = net.transport(ip(2)).listen(addr(2)).await.err().unwrap();
    assert_eq!(again.kind(), io::ErrorKind::AddrInUse);
}

#[tokio::test(start_paused = true)]
async fn a_partition_holds_traffic_and_connects_until_it_heals() {
    let net = MemNet::new(1);
    let (mut c, mut s, _l) = pair(&net).await;
    net.split(&[ip(1)], &[ip(2)]);
    c.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    assert!(timeout(LONG, s.read_exact(&mut buf)).await.is_err());
    let t = net.transport(ip(1));
    assert!(timeout(LONG, t.connect(addr(2))).await.is_err());
    net.heal();
    assert_eq!(read_n(&mut s, 4).await, b"held");
    assert!(t.connect(addr(2)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_one_way_block_stops_one_direction_only() {
    let net = MemNet::new(1);
    let (mut c, mut s, _l) = pair(&net).await;
    net.block(ip(1), ip(2));
    s.write_all(b"back").await.unwrap();
    assert_eq!(read_n(&mut c, 4).await, b"back");
    c.write_all(b"lost").await.unwrap();
    assert!(timeout(LONG, s.read_exact(&mut [0; 4])).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_cut_resets_the_connections_of_a_node() {
    let net = MemNet::new(1);
    let (mut c, mut s, _l) = pair(&net).await;
    assert_eq!(net.open_connections(), 1);
    net.cut(ip(2));
    assert_eq!(c.read(&mut [0; 4]).await.unwrap_or(0), 0);
    assert_eq!(s.read(&mut [0; 4]).await.unwrap_or(0), 0);
    assert_eq!(net.open_connections(), 0);
    // The listener survives a cut.
    assert!(net.transport(ip(1)).connect(addr(2)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_crashed_node_refuses_until_it_listens_again() {
    let net = MemNet::new(1);
    let (mut c, _s, _l) = pair(&net).await;
    net.crash(ip(2));
    assert_eq!(c.read(&mut [0; 4]).await.unwrap_or(0), 0);
    let t = net.transport(ip(1));
    let err = t.connect(addr(2)).await.err().unwrap();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    drop(_l);
    let _l2 = net.transport(ip(2)).listen(addr(2)).await.unwrap();
    assert!(t.connect(addr(2)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn delays_apply_and_keep_order() {
    let net = MemNet::new(7);
    net.set_delay(Duration::from_millis(10), Duration::from_millis(30));
    let (mut c, mut s, _l) = pair(&net).await;
    let t0 = Instant::now();
    for i in 0..20u8 {
        c.write_all(&[i]).await.unwrap();
        tokio::task::yield_now().await;
    }
    let got = read_n(&mut s, 20).await;
    assert_eq!(got, (0..20).collect::<Vec<u8>>());
    assert!(t0.elapsed() >= Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn cluster_calls_run_over_it_and_heal_after_a_partition() {
    let net = MemNet::new(3);
    let mut server_cfg = cfg("srv", 2);
    server_cfg.transport = net.transport(ip(2));
    let listener = server_cfg.transport.listen(addr(2)).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server::serve(
        listener,
        server_cfg,
        Arc::new(Echo),
        cancel.clone(),
    ));
    let mut client_cfg = cfg("cli", 1);
    client_cfg.transport = net.transport(ip(1));
    let client = PeerClient::new(addr(2), client_cfg, Some(2));
    let ok = |r| matches!(r, Ok(Reply::Status(_)));
    assert!(ok(client.call(Request::Status, LONG).await));
    net.split(&[ip(1)], &[ip(2)]);
    let short = Duration::from_secs(1);
    assert!(!ok(client.call(Request::Status, short).await));
    net.heal();
    // The silent link was dropped; the next call opens a fresh one.
    assert!(ok(client.call(Request::Status, LONG).await));
    assert_eq!(client.links_opened(), 2);
    cancel.cancel();
    task.await.unwrap();
}
