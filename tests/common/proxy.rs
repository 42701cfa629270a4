//! A man in the middle of cluster links, on loopback: it forwards each
//! connection to one upstream address, records what the connecting side
//! sent, and can repeat one of its frames into the stream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the connecting side of each connection sent, in order.
type Captured = Arc<Mutex<Vec<Vec<u8>>>>;

pub struct Proxy {
    pub addr: SocketAddr,
    captured: Captured,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards to `upstream`. On the first connection only, the frame
    /// with index `repeat` (counted from 0, in what the connecting side
    /// sends) is sent twice, as an attacker replaying it would.
    pub async fn start(upstream: SocketAddr, repeat: Option<usize>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let captured = Captured::default();
        let task = tokio::spawn({
            let captured = captured.clone();
            async move {
                let mut first = true;
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let index = {
                        let mut c = captured.lock().unwrap();
                        c.push(Vec::new());
                        c.len() - 1
                    };
                    let repeat = if first { repeat } else { None };
                    first = false;
                    tokio::spawn(pump(client, server, captured.clone(), index, repeat));
                }
            }
        });
        Proxy {
            addr,
            captured,
            task,
        }
    }

    /// What each connection's connecting side sent so far.
    pub fn captured(&self) -> Vec<Vec<u8>> {
        self.captured.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    client: TcpStream,
    server: TcpStream,
    captured: Captured,
    index: usize,
    repeat: Option<usize>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    // Bytes of frames not yet complete, to find frame boundaries.
    let mut pending = Vec::new();
    let mut frame = 0;
    while let Ok(n) = cr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        captured.lock().unwrap()[index].extend_from_slice(&buf[..n]);
        pending.extend_from_slice(&buf[..n]);
        while pending.len() >= 4 {
            let len = u32::from_be_bytes(pending[..4].try_into().unwrap()) as usize;
            if pending.len() < 4 + len {
                break;
            }
            let whole: Vec<u8> = pending.drain(..4 + len).collect();
            let times = if Some(frame) == repeat { 2 } else { 1 };
            for _ in 0..times {
                if sw.write_all(&whole).await.is_err() {
                    return;
                }
            }
            frame += 1;
        }
    }
    let _ = sw.shutdown().await;
    let _ = back.await;
}
