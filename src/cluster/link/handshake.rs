//! The mutual-authentication handshake of a node-to-node link, as a pure
//! state machine: messages and timeouts in, [`Action`]s out. No sockets,
//! clock or randomness; the driver passes in the fresh nonce and calls
//! [`Handshake::on_timeout`] when its deadline passes.
//!
//! # Protocol (version [`PROTO_VERSION`])
//!
//! 1. On connect, both sides send `Hello { proto, cluster, name,
//!    incarnation, nonce, key }` at once, without waiting for the other;
//!    `key` is a fresh X25519 public key.
//! 2. On the peer's Hello, a side checks, in this order: the protocol
//!    version (`Incompatible`), the cluster name (`WrongCluster`), that the
//!    name and incarnation are well formed, that the peer is not itself
//!    (`SelfConnect`) and did not echo our nonce. It then computes the
//!    transcript hash `T = SHA-256("mtad-cluster-v2 transcript" ‖ proto ‖
//!    cluster ‖ initiator's name, incarnation, nonce, key ‖ the acceptor's
//!    same four)`, strings length-prefixed so no two inputs encode alike,
//!    and sends `Proof { mac }` with `mac = HMAC-SHA256(secret,
//!    "mtad-cluster-v2 proof" ‖ role ‖ T)`. Both nonces make a proof
//!    useless on any other connection (each verifier picks a fresh nonce);
//!    the role byte makes it useless reflected back to its maker; the keys
//!    in `T` make it useless to a man in the middle who swaps them.
//! 3. On the peer's Proof, a side verifies it in constant time against
//!    its secret and any others it also accepts (`BadProof` when none
//!    matches). Its own Proof already went out
//!    when the peer's Hello arrived, so a verified Proof means
//!    [`Action::Established`].
//!
//! Once a side has verified the peer's Proof, everything it sends is
//! sealed (see [`super::seal`]) with keys derived from the secret the
//! initiator proved with (so a cluster can move to a new secret node by
//! node, each accepting both meanwhile), the
//! X25519 shared secret and `T`: only the two ends of this connection can
//! read or write it, and a leaked secret does not open recorded traffic.
//! (A refusal before that, e.g. on a timeout, goes in the clear.) The driver does the key
//! agreement; this machine only records what it needs
//! ([`Handshake::session`]).
//!
//! Every refusal first sends `Refuse { reason }` so the peer can log the
//! specific reason, then closes. Because each side runs the same checks,
//! a wrong secret, cluster or version is normally reported by both sides
//! as their own finding; a received `Refuse` ends the link as
//! `RefusedByPeer`. Any other message in the wrong place (a second Hello, a
//! Proof before Hello or after establishment, application data before
//! establishment, an unknown or undecodable message) is a
//! `ProtocolViolation`. After establishment the machine keeps running:
//! it hands application messages to the caller.
//!
//! The secret is shared by all members, so the handshake proves cluster
//! membership, not that the peer really is the node it names.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::frame::FrameError;
use super::message::{LinkMessage, Nonce, PublicKey, RefuseReason};
use crate::cluster::identity::{Identity, Keyring, Secret, MAX_NAME_LEN};

/// The link protocol version this build speaks.
pub const PROTO_VERSION: u16 = 2;
/// Frame cap before the peer is authenticated: a Hello is far smaller, and
/// an unauthenticated peer must not make us buffer megabytes.
pub const MAX_HANDSHAKE_FRAME: usize = 4096;
/// Domain separation for the proof MAC.
const MAC_LABEL: &[u8] = b"mtad-cluster-v2 proof";
/// Domain separation for the transcript hash.
const TRANSCRIPT_LABEL: &[u8] = b"mtad-cluster-v2 transcript";

type HmacSha256 = Hmac<Sha256>;

/// Which end of the TCP connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We connected.
    Initiator,
    /// We accepted.
    Acceptor,
}

impl Role {
    pub(crate) fn byte(self) -> u8 {
        match self {
            Role::Initiator => 1,
            Role::Acceptor => 2,
        }
    }

    pub(crate) fn other(self) -> Role {
        match self {
            Role::Initiator => Role::Acceptor,
            Role::Acceptor => Role::Initiator,
        }
    }
}

/// How a link ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LinkEnd {
    /// We refused the peer (and told it why).
    #[error("refused peer: {0}")]
    Refused(RefuseReason),
    /// The peer refused us.
    #[error("refused by peer: {0}")]
    RefusedByPeer(RefuseReason),
    /// The connection closed without a refusal.
    #[error("connection closed by peer")]
    PeerClosed,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message.
    Send(LinkMessage),
    /// The peer is authenticated; application messages may flow.
    Established(Identity),
    /// An application message from the authenticated peer.
    Deliver(serde_json::Value),
    /// Close the connection (after sending what came before).
    Close(LinkEnd),
}

/// What the driver needs to derive an established link's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The secret the initiator proved with: the link's keys derive from
    /// it, so both ends agree even while they prove with different ones.
    pub secret: Secret,
    /// The peer's ephemeral X25519 key.
    pub peer_key: PublicKey,
    /// The transcript hash both sides agreed on.
    pub transcript: [u8; 32],
}

/// One side's Hello, as bound into the transcript.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Side<'a> {
    pub(crate) id: &'a Identity,
    pub(crate) nonce: &'a Nonce,
    pub(crate) key: &'a PublicKey,
}

#[derive(Debug, Clone)]
enum State {
    /// Our Hello is out; waiting for the peer's.
    AwaitHello,
    /// Both Hellos seen and our Proof out; waiting for the peer's Proof.
    AwaitProof { peer: Identity, session: Session },
    /// Authenticated.
    Established { peer: Identity, session: Session },
    /// Over; every input is ignored.
    Closed(LinkEnd),
}

/// One side of one connection's handshake (and its later message routing).
#[derive(Debug, Clone)]
pub struct Handshake {
    role: Role,
    local: Identity,
    cluster: String,
    secrets: Keyring,
    nonce: Nonce,
    key: PublicKey,
    state: State,
}

impl Handshake {
    /// Starts a handshake; the returned actions send our Hello.
    /// `nonce` must be fresh random bytes and `key` a fresh ephemeral
    /// X25519 public key, neither ever reused.
    pub fn start(
        role: Role,
        local: Identity,
        cluster: &str,
        secrets: Keyring,
        nonce: Nonce,
        key: PublicKey,
    ) -> (Handshake, Vec<Action>) {
        let hello = LinkMessage::Hello {
            proto: PROTO_VERSION,
            cluster: cluster.to_owned(),
            name: local.name.clone(),
            incarnation: local.incarnation,
            nonce,
            key,
        };
        let hs = Handshake {
            role,
            local,
            cluster: cluster.to_owned(),
            secrets,
            nonce,
            key,
            state: State::AwaitHello,
        };
        (hs, vec![Action::Send(hello)])
    }

    /// The authenticated peer, once established.
    pub fn peer(&self) -> Option<&Identity> {
        match &self.state {
            State::Established { peer, .. } => Some(peer),
            _ => None,
        }
    }

    /// What the link's keys derive from, once established.
    pub fn session(&self) -> Option<&Session> {
        match &self.state {
            State::Established { session, .. } => Some(session),
            _ => None,
        }
    }

    /// Whether the peer is authenticated and the link still open.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established { .. })
    }

    /// How the link ended, if it has.
    pub fn end(&self) -> Option<&LinkEnd> {
        match &self.state {
            State::Closed(end) => Some(end),
            _ => None,
        }
    }

    /// Handles one received message.
    pub fn on_message(&mut self, msg: LinkMessage) -> Vec<Action> {
        let state = std::mem::replace(&mut self.state, State::AwaitHello);
        match (state, msg) {
            (State::Closed(end), _) => {
                self.state = State::Closed(end);
                vec![]
            }
            (_, LinkMessage::Refuse { reason }) => {
                self.close(LinkEnd::RefusedByPeer(reason.bounded()))
            }
            (
                State::AwaitHello,
                LinkMessage::Hello {
                    proto,
                    cluster,
                    name,
                    incarnation,
                    nonce,
                    key,
                },
            ) => self.on_hello(proto, cluster, Identity { name, incarnation }, nonce, key),
            (State::AwaitProof { peer, mut session }, LinkMessage::Proof { mac }) => {
                let theirs = self.secrets.all().find(|secret| {
                    let verifier = proof_mac(secret, self.role.other(), &session.transcript);
                    verifier.verify_slice(&mac).is_ok()
                });
                let Some(theirs) = theirs else {
                    return self.refuse(RefuseReason::BadProof);
                };
                if self.role == Role::Acceptor {
                    session.secret = theirs.clone();
                }
                self.state = State::Established {
                    peer: peer.clone(),
                    session,
                };
                vec![Action::Established(peer)]
            }
            (State::Established { peer, session }, LinkMessage::App { body }) => {
                self.state = State::Established { peer, session };
                vec![Action::Deliver(body)]
            }
            (state, msg) => {
                let detail = match (&state, &msg) {
                    (_, LinkMessage::Unknown) => "unknown message type",
                    (State::AwaitHello, LinkMessage::Proof { .. }) => "proof before hello",
                    (State::AwaitHello | State::AwaitProof { .. }, LinkMessage::App { .. }) => {
                        "application message before authentication"
                    }
                    (_, LinkMessage::Hello { .. }) => "duplicate hello",
                    (_, LinkMessage::Proof { .. }) => "duplicate proof",
                    _ => "unexpected message",
                };
                self.refuse(RefuseReason::violation(detail))
            }
        }
    }

    /// Handles a frame that could not be decoded; the stream is unusable.
    pub fn on_bad_frame(&mut self, err: &FrameError) -> Vec<Action> {
        if matches!(self.state, State::Closed(_)) {
            return vec![];
        }
        self.refuse(RefuseReason::violation(format!("bad frame: {err}")))
    }

    /// The driver's handshake deadline passed; ignored once established.
    pub fn on_timeout(&mut self) -> Vec<Action> {
        match self.state {
            State::AwaitHello | State::AwaitProof { .. } => self.refuse(RefuseReason::TimedOut),
            State::Established { .. } | State::Closed(_) => vec![],
        }
    }

    /// The peer closed the connection (EOF or reset).
    pub fn on_eof(&mut self) -> Vec<Action> {
        if matches!(self.state, State::Closed(_)) {
            return vec![];
        }
        self.close(LinkEnd::PeerClosed)
    }

    fn on_hello(
        &mut self,
        proto: u16,
        cluster: String,
        peer: Identity,
        nonce: Nonce,
        key: PublicKey,
    ) -> Vec<Action> {
        if proto != PROTO_VERSION {
            return self.refuse(RefuseReason::Incompatible {
                expected: PROTO_VERSION,
                got: proto,
            });
        }
        if cluster != self.cluster {
            return self.refuse(
                RefuseReason::WrongCluster {
                    expected: self.cluster.clone(),
                    got: cluster,
                }
                .bounded(),
            );
        }
        if peer.name.is_empty() || peer.name.len() > MAX_NAME_LEN {
            return self.refuse(RefuseReason::violation("bad node name length"));
        }
        if peer.incarnation == 0 {
            return self.refuse(RefuseReason::violation("incarnation 0"));
        }
        if peer.incarnation == self.local.incarnation {
            if peer.name == self.local.name {
                return self.refuse(RefuseReason::SelfConnect);
            }
            // Random 64-bit ids do not collide; a copied data dir does.
            return self.refuse(RefuseReason::violation(
                "peer has our incarnation under another name (copied data dir?)",
            ));
        }
        if nonce == self.nonce {
            return self.refuse(RefuseReason::violation("peer echoed our nonce"));
        }
        if key == [0; 32] || key == self.key {
            // All zeros is what a Hello without a key parses to.
            return self.refuse(RefuseReason::violation("missing or echoed key"));
        }
        let ours = Side {
            id: &self.local,
            nonce: &self.nonce,
            key: &self.key,
        };
        let theirs = Side {
            id: &peer,
            nonce: &nonce,
            key: &key,
        };
        let (initiator, acceptor) = match self.role {
            Role::Initiator => (ours, theirs),
            Role::Acceptor => (theirs, ours),
        };
        let session = Session {
            // Ours, until an initiator's proof says otherwise.
            secret: self.secrets.proving.clone(),
            peer_key: key,
            transcript: transcript(&self.cluster, initiator, acceptor),
        };
        let mac = proof_mac(&self.secrets.proving, self.role, &session.transcript)
            .finalize()
            .into_bytes()
            .into();
        self.state = State::AwaitProof { peer, session };
        vec![Action::Send(LinkMessage::Proof { mac })]
    }

    fn refuse(&mut self, reason: RefuseReason) -> Vec<Action> {
        let mut out = vec![Action::Send(LinkMessage::Refuse {
            reason: reason.clone(),
        })];
        out.extend(self.close(LinkEnd::Refused(reason)));
        out
    }

    fn close(&mut self, end: LinkEnd) -> Vec<Action> {
        self.state = State::Closed(end.clone());
        vec![Action::Close(end)]
    }
}

/// The hash of both Hellos, initiator's first: everything that identifies
/// this connection, which proofs and keys are bound to.
pub(crate) fn transcript(cluster: &str, initiator: Side, acceptor: Side) -> [u8; 32] {
    let mut h = Sha256::new();
    let put_str = |h: &mut Sha256, s: &str| {
        h.update((s.len() as u32).to_be_bytes());
        h.update(s.as_bytes());
    };
    h.update(TRANSCRIPT_LABEL);
    h.update(PROTO_VERSION.to_be_bytes());
    put_str(&mut h, cluster);
    for side in [initiator, acceptor] {
        put_str(&mut h, &side.id.name);
        h.update(side.id.incarnation.to_be_bytes());
        h.update(side.nonce);
        h.update(side.key);
    }
    h.finalize().into()
}

/// The MAC by which the side in `prover_role` proves it knows the secret.
pub(crate) fn proof_mac(secret: &Secret, prover_role: Role, transcript: &[u8; 32]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret.expose()).expect("HMAC takes any key length");
    mac.update(MAC_LABEL);
    mac.update(&[prover_role.byte()]);
    mac.update(transcript);
    mac
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
