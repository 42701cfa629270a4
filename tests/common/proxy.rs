//! A man in the middle of cluster links, on loopback: it forwards each
//! connection to one upstream address, records what the connecting side
//! sent, and can slip an extra frame into the stream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the connecting side of each connection sent, in order.
type Captured = Arc<Mutex<Vec<Vec<u8>>>>;

/// An extra frame sent upstream right after the connecting side's frame
/// with index `after` (counted from 0).
#[derive(Clone)]
pub enum Inject {
    /// That frame again, as a replay inside the connection would.
    Repeat { after: usize },
    /// A whole frame (header included) from elsewhere.
    Splice { after: usize, frame: Vec<u8> },
}

/// The frames (header included) in what one side sent.
pub fn frames(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        if bytes.len() < 4 + len {
            break;
        }
        out.push(bytes[..4 + len].to_vec());
        bytes = &bytes[4 + len..];
    }
    out
}

pub struct Proxy {
    pub addr: SocketAddr,
    captured: Captured,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards to `upstream`; the i-th connection gets `inject[i]`,
    /// later ones nothing.
    pub async fn start(upstream: SocketAddr, inject: Vec<Inject>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let captured = Captured::default();
        let task = tokio::spawn({
            let captured = captured.clone();
            async move {
                let mut plan = inject.into_iter();
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let index = {
                        let mut c = captured.lock().unwrap();
                        c.push(Vec::new());
                        c.len() - 1
                    };
                    let inject = plan.next();
                    tokio::spawn(pump(client, server, captured.clone(), index, inject));
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
    inject: Option<Inject>,
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
            let extra = match &inject {
                Some(Inject::Repeat { after }) if *after == frame => Some(&whole),
                Some(Inject::Splice { after, frame: f }) if *after == frame => Some(f),
                _ => None,
            };
            for bytes in std::iter::once(&whole).chain(extra) {
                if sw.write_all(bytes).await.is_err() {
                    return;
                }
            }
            frame += 1;
        }
    }
    let _ = sw.shutdown().await;
    let _ = back.await;
}
