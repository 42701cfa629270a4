//! The async driver that runs the [`Handshake`] over a real stream and
//! then carries application messages as sealed frames ([`super::seal`]).
//!
//! A [`Link`] is single-use: after any error it is dropped and the caller
//! reconnects (with backoff) on a fresh connection; nothing here retries.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::{timeout_at, Instant};

use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};

use super::frame::{encode_with_max, FrameDecoder, FrameError};
use super::handshake::{Action, Handshake, LinkEnd, Role, MAX_HANDSHAKE_FRAME};
use super::message::{LinkMessage, Nonce, PublicKey, RefuseReason};
use super::seal::{self, Opener, Sealer, MAX_SEALED_FRAME};
use super::transport::{Io, Stream, Transport};
use crate::cluster::identity::{Identity, Keyring};
use thiserror::Error;

/// Default time allowed for connect plus handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time to get a final Refuse out after the deadline passed, so the
/// peer learns why; a peer that does not read even then is just dropped.
const REFUSE_GRACE: Duration = Duration::from_secs(1);
/// Read buffer size.
const READ_CHUNK: usize = 16 * 1024;

/// What a node needs to open or accept links.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// This node.
    pub identity: Identity,
    /// The cluster secret this node proves with, and others it accepts
    /// while the cluster changes its secret.
    pub secrets: Keyring,
    /// The cluster name.
    pub cluster: String,
    /// Deadline for connect plus handshake.
    pub handshake_timeout: Duration,
    /// What carries the links (TCP, or an in-memory network in tests).
    pub transport: Arc<dyn Transport>,
}

/// Why a link could not be set up or stopped working.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The TCP connect failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// Where we tried to connect.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The TCP connect did not finish before the handshake deadline.
    #[error("connect to {0}: timed out")]
    ConnectTimedOut(SocketAddr),
    /// Reading or writing the connection failed.
    #[error("link i/o: {0}")]
    Io(#[from] io::Error),
    /// The handshake or link ended: refused (by us or the peer), or closed.
    #[error(transparent)]
    Ended(#[from] LinkEnd),
    /// A message could not be framed (e.g. larger than the frame cap).
    #[error("cannot send: {0}")]
    Frame(#[from] FrameError),
    /// The OS random source failed.
    #[error("random source failed: {0}")]
    Random(getrandom::Error),
    /// The ephemeral key could not be made, or the peer's was unusable.
    #[error("key exchange failed: {0}")]
    KeyExchange(&'static str),
    /// An earlier error broke this writer; the link must be dropped.
    #[error("link already failed")]
    Broken,
}

/// An authenticated link to a peer.
#[derive(Debug)]
pub struct Link<S = Stream> {
    /// The authenticated peer.
    pub peer: Identity,
    /// Receiving half.
    pub reader: LinkReader<S>,
    /// Sending half.
    pub writer: LinkWriter<S>,
}

/// Connects to `addr` and authenticates as the initiator.
pub async fn connect(addr: SocketAddr, cfg: &LinkConfig) -> Result<Link, LinkError> {
    let deadline = Instant::now() + cfg.handshake_timeout;
    let stream = match timeout_at(deadline, cfg.transport.connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(LinkError::Connect { addr, source }),
        Err(_) => return Err(LinkError::ConnectTimedOut(addr)),
    };
    logged(
        addr,
        Role::Initiator,
        run(stream, Role::Initiator, cfg, deadline).await,
    )
}

/// Authenticates a connection accepted from `addr` as the acceptor.
pub async fn accept<S: Io>(
    stream: S,
    addr: SocketAddr,
    cfg: &LinkConfig,
) -> Result<Link, LinkError> {
    let deadline = Instant::now() + cfg.handshake_timeout;
    let stream: Stream = Box::new(stream);
    logged(
        addr,
        Role::Acceptor,
        run(stream, Role::Acceptor, cfg, deadline).await,
    )
}

/// Runs the handshake over any stream (sockets, in-memory pipes in tests).
pub async fn handshake<S>(stream: S, role: Role, cfg: &LinkConfig) -> Result<Link<S>, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    run(stream, role, cfg, Instant::now() + cfg.handshake_timeout).await
}

fn logged(addr: SocketAddr, role: Role, r: Result<Link, LinkError>) -> Result<Link, LinkError> {
    match &r {
        Ok(link) => tracing::info!(
            %addr, ?role, peer = %link.peer.name,
            incarnation = format_args!("{:016x}", link.peer.incarnation),
            "cluster link established"
        ),
        Err(e) => {
            if let LinkError::Ended(LinkEnd::Refused(reason)) = e {
                crate::metrics::cluster_link_refused(reason.kind());
            }
            tracing::warn!(%addr, ?role, error = %e, "cluster link failed")
        }
    }
    r
}

async fn run<S>(
    stream: S,
    role: Role,
    cfg: &LinkConfig,
    deadline: Instant,
) -> Result<Link<S>, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut nonce: Nonce = [0; 32];
    getrandom::fill(&mut nonce).map_err(LinkError::Random)?;
    let rng = ring::rand::SystemRandom::new();
    let ephemeral = EphemeralPrivateKey::generate(&X25519, &rng)
        .map_err(|_| LinkError::KeyExchange("cannot make an ephemeral key"))?;
    let public: PublicKey = ephemeral
        .compute_public_key()
        .ok()
        .and_then(|k| k.as_ref().try_into().ok())
        .ok_or(LinkError::KeyExchange("cannot compute the public key"))?;
    let mut ephemeral = Some(ephemeral);
    let (mut hs, mut actions) = Handshake::start(
        role,
        cfg.identity.clone(),
        &cfg.cluster,
        cfg.secrets.clone(),
        nonce,
        public,
    );
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Until the peer is authenticated it may not make us buffer much.
    let mut dec = FrameDecoder::new(MAX_HANDSHAKE_FRAME);
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        for action in std::mem::take(&mut actions) {
            match action {
                Action::Send(msg) => {
                    // Refused here rather than by the peer's cap.
                    let bytes = encode_with_max(&msg, MAX_HANDSHAKE_FRAME)?;
                    let sent = timeout_at(deadline + REFUSE_GRACE, wr.write_all(&bytes)).await;
                    // A failed Refuse must not hide the reason we refused for:
                    // the peer may well have closed already.
                    if hs.end().is_none() {
                        match sent {
                            Ok(r) => r?,
                            Err(_) => return Err(LinkEnd::Refused(RefuseReason::TimedOut).into()),
                        }
                    }
                }
                Action::Established(peer) => {
                    let session = hs
                        .session()
                        .expect("an established handshake has a session");
                    let ephemeral = ephemeral.take().expect("established once");
                    let theirs = UnparsedPublicKey::new(&X25519, session.peer_key);
                    let keys = agree_ephemeral(ephemeral, &theirs, |shared| {
                        seal::keys(&session.secret, shared, &session.transcript, role)
                    })
                    .map_err(|_| LinkError::KeyExchange("the peer's key is unusable"))?;
                    // Bytes after the peer's Proof (its first sealed
                    // messages) stay in `dec`; now larger frames are allowed.
                    dec.set_max(MAX_SEALED_FRAME);
                    return Ok(Link {
                        peer,
                        reader: LinkReader {
                            inner: rd,
                            dec,
                            open: keys.recv,
                            hs,
                            buf,
                        },
                        writer: LinkWriter {
                            inner: wr,
                            seal: keys.send,
                            broken: false,
                        },
                    });
                }
                // Only an established machine delivers, and we return on that.
                Action::Deliver(_) => unreachable!("delivery before establishment"),
                Action::Close(end) => {
                    linger(
                        &mut rd,
                        &mut wr,
                        &mut buf,
                        deadline.max(Instant::now()) + REFUSE_GRACE,
                    )
                    .await;
                    return Err(end.into());
                }
            }
        }
        actions = match dec.next_message::<LinkMessage>() {
            Ok(Some(msg)) => hs.on_message(msg),
            Err(e) => hs.on_bad_frame(&e),
            Ok(None) => match timeout_at(deadline, rd.read(&mut buf)).await {
                Ok(Ok(0)) => hs.on_eof(),
                Ok(Ok(n)) => {
                    dec.feed(&buf[..n]);
                    continue;
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => hs.on_timeout(),
            },
        };
    }
}

/// Closes gracefully so our Refuse reaches the peer: closing a socket with
/// unread input makes the kernel send a reset, which can destroy the Refuse
/// before the peer reads it. So: FIN, then read and discard until the peer
/// closes too or the grace ends.
async fn linger<S: AsyncRead + AsyncWrite>(
    rd: &mut ReadHalf<S>,
    wr: &mut WriteHalf<S>,
    buf: &mut [u8],
    until: Instant,
) {
    let _ = timeout_at(until, async {
        let _ = wr.shutdown().await;
        while let Ok(n) = rd.read(buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Receiving half of an authenticated link.
#[derive(Debug)]
pub struct LinkReader<S = Stream> {
    inner: ReadHalf<S>,
    dec: FrameDecoder,
    open: Opener,
    hs: Handshake,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LinkReader<S> {
    /// The next application message; cancel-safe (usable in `select!`).
    /// Any error is final: a forged, malformed, oversized or out-of-place
    /// frame, a refusal, or EOF ends the link, and the caller drops both
    /// halves (the peer then sees the close).
    pub async fn recv(&mut self) -> Result<serde_json::Value, LinkError> {
        loop {
            if let Some(end) = self.hs.end() {
                return Err(end.clone().into());
            }
            let mut forged = false;
            let actions = match self.open.next(&mut self.dec) {
                Ok(Some(msg)) => self.hs.on_message(msg),
                Err(e) => {
                    forged = e == FrameError::Forged;
                    self.hs.on_bad_frame(&e)
                }
                Ok(None) => match self.inner.read(&mut self.buf).await {
                    Ok(0) => self.hs.on_eof(),
                    Ok(n) => {
                        self.dec.feed(&self.buf[..n]);
                        continue;
                    }
                    Err(e) => {
                        // Never read from a stream after an error.
                        self.hs.on_eof();
                        return Err(e.into());
                    }
                },
            };
            for action in actions {
                match action {
                    Action::Deliver(body) => return Ok(body),
                    Action::Close(end) => {
                        if let LinkEnd::Refused(reason) = &end {
                            let kind = if forged { "forged" } else { reason.kind() };
                            crate::metrics::cluster_link_refused(kind);
                            tracing::warn!(peer = %self.hs_peer(), %reason, "refusing cluster link");
                        }
                        return Err(end.into());
                    }
                    // Sends (our Refuse) cannot go out from the read half;
                    // the close tells the peer enough.
                    Action::Send(_) | Action::Established(_) => {}
                }
            }
        }
    }

    fn hs_peer(&self) -> String {
        self.hs.peer().map(|p| p.name.clone()).unwrap_or_default()
    }
}

/// Sending half of an authenticated link.
#[derive(Debug)]
pub struct LinkWriter<S = Stream> {
    inner: WriteHalf<S>,
    seal: Sealer,
    broken: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LinkWriter<S> {
    /// Sends one application message. Not cancel-safe: a cancelled send
    /// breaks the writer.
    pub async fn send(&mut self, body: serde_json::Value) -> Result<(), LinkError> {
        self.send_message(&LinkMessage::App { body }).await
    }

    /// Tells the peer why the link ends, then closes the sending side.
    pub async fn refuse(&mut self, reason: RefuseReason) -> Result<(), LinkError> {
        self.send_message(&LinkMessage::Refuse { reason }).await?;
        self.broken = true;
        self.inner.shutdown().await?;
        Ok(())
    }

    async fn send_message(&mut self, msg: &LinkMessage) -> Result<(), LinkError> {
        if self.broken {
            return Err(LinkError::Broken);
        }
        // Oversized messages are refused here, before anything is written,
        // so the stream stays intact.
        let bytes = self.seal.seal(msg)?;
        // Broken until the whole frame is out: after a write error or a
        // cancelled send, a partial frame may be on the wire, so the link
        // must never be written again.
        self.broken = true;
        self.inner.write_all(&bytes).await?;
        self.broken = false;
        Ok(())
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
