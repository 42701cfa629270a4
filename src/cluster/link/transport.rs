//! How cluster links reach peers: real TCP, or (in tests) the in-memory
//! network of [`super::memnet`], which can cut, partition and delay links.
//! Everything above this — handshake, frames, calls, raft — is the same
//! code on both.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// A byte stream a link runs over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection, whatever carries it.
pub type Stream = Box<dyn Io>;

/// Opens connections to peers and accepts theirs.
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Connects to `to`; an unreachable peer may make this wait, so
    /// callers bound it with their own deadline.
    fn connect(&self, to: SocketAddr) -> BoxFuture<'_, io::Result<Stream>>;
    /// Starts accepting connections on `addr`.
    fn listen(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Listener>>>;
}

/// Accepts connections.
pub trait Listener: Send + 'static {
    /// The next connection and the address it came from.
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(Stream, SocketAddr)>>;
    /// Where it listens.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl<L: Listener + ?Sized> Listener for Box<L> {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(Stream, SocketAddr)>> {
        (**self).accept()
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        (**self).local_addr()
    }
}

/// Real TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp;

impl Tcp {
    /// The TCP transport as links hold it.
    pub fn shared() -> Arc<dyn Transport> {
        Arc::new(Tcp)
    }
}

impl Transport for Tcp {
    fn connect(&self, to: SocketAddr) -> BoxFuture<'_, io::Result<Stream>> {
        Box::pin(async move {
            let stream = TcpStream::connect(to).await?;
            // Handshake and raft messages are small and latency-bound.
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as Stream)
        })
    }

    fn listen(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Listener>>> {
        Box::pin(async move { Ok(Box::new(TcpListener::bind(addr).await?) as Box<dyn Listener>) })
    }
}

impl Listener for TcpListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(Stream, SocketAddr)>> {
        Box::pin(async move {
            let (stream, peer) = TcpListener::accept(self).await?;
            stream.set_nodelay(true)?;
            Ok((Box::new(stream) as Stream, peer))
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}
