//! Messages of the node-to-node link, one per frame (see [`super::frame`]).
//!
//! The handshake messages (`hello`, `proof`, `refuse`) keep their shape in
//! every protocol version, so a node always understands enough of an
//! incompatible peer to refuse it with a specific reason. Later messages
//! (raft RPCs, joins) travel as [`LinkMessage::App`], sealed (see
//! [`super::seal`]), as does a refusal on an established link.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Length of a handshake nonce and of a proof MAC.
pub const NONCE_LEN: usize = 32;
/// A fresh random challenge, one per side per connection.
pub type Nonce = [u8; NONCE_LEN];
/// An X25519 public key, fresh per side per connection.
pub type PublicKey = [u8; 32];
/// Longest peer-supplied text kept from a received refusal (it gets logged).
pub const MAX_REASON_TEXT: usize = 256;

/// One message on a node-to-node link; JSON with a `type` tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LinkMessage {
    /// First message of each side: who it is and its challenge.
    Hello {
        /// Link protocol version.
        proto: u16,
        /// Cluster name from `[cluster] name`.
        cluster: String,
        /// Node name.
        name: String,
        /// Node incarnation.
        incarnation: u64,
        /// Fresh challenge for the peer's proof.
        #[serde(with = "hex32")]
        nonce: Nonce,
        /// Ephemeral X25519 key for this connection's session keys.
        /// Defaults to zeros so a version-1 Hello (which has none) still
        /// parses and is refused as incompatible rather than malformed.
        #[serde(default, with = "hex32")]
        key: PublicKey,
    },
    /// Proof of knowing the cluster secret, bound to this connection.
    Proof {
        /// HMAC-SHA256, see [`super::handshake`].
        #[serde(with = "hex32")]
        mac: [u8; 32],
    },
    /// The sender gives up on the link, saying why; it closes next.
    Refuse {
        /// Why.
        reason: RefuseReason,
    },
    /// An application message (raft, membership), only after authentication.
    App {
        /// Message content, interpreted by the layer above.
        body: serde_json::Value,
    },
    /// Any tag this version does not know.
    #[serde(other)]
    Unknown,
}

/// Why a link was refused; sent to the peer and logged on both sides.
///
/// Fields are named from the refuser's view (`expected` is the refuser's
/// own value, `got` what the peer sent) so they read right on either side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RefuseReason {
    /// Link protocol versions differ.
    #[error("incompatible protocol version: expected {expected}, got {got}")]
    Incompatible {
        /// The refuser's version.
        expected: u16,
        /// The version received.
        got: u16,
    },
    /// The peer belongs to another cluster.
    #[error("wrong cluster: expected {expected:?}, got {got:?}")]
    WrongCluster {
        /// The refuser's cluster name.
        expected: String,
        /// The cluster name received.
        got: String,
    },
    /// The node connected to itself (e.g. its own address among the seeds).
    #[error("connected to itself")]
    SelfConnect,
    /// The peer's proof did not verify: the cluster secrets differ.
    #[error("bad proof (cluster secrets differ)")]
    BadProof,
    /// A message out of order, duplicated, malformed or unknown.
    #[error("protocol violation: {detail}")]
    ProtocolViolation {
        /// What was wrong.
        detail: String,
    },
    /// The handshake did not finish before the deadline.
    #[error("handshake timed out")]
    TimedOut,
    /// A reason this version does not know.
    #[error("unknown reason")]
    #[serde(other)]
    Other,
}

impl RefuseReason {
    /// The reason's kind, as on the wire (`bad_proof`, `timed_out`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            RefuseReason::Incompatible { .. } => "incompatible",
            RefuseReason::WrongCluster { .. } => "wrong_cluster",
            RefuseReason::SelfConnect => "self_connect",
            RefuseReason::BadProof => "bad_proof",
            RefuseReason::ProtocolViolation { .. } => "protocol_violation",
            RefuseReason::TimedOut => "timed_out",
            RefuseReason::Other => "other",
        }
    }

    /// A protocol violation with this detail.
    pub fn violation(detail: impl Into<String>) -> Self {
        RefuseReason::ProtocolViolation {
            detail: detail.into(),
        }
    }

    /// Cuts peer-supplied text down so a peer cannot flood our logs.
    pub fn bounded(self) -> Self {
        match self {
            RefuseReason::WrongCluster { expected, got } => RefuseReason::WrongCluster {
                expected: truncate(expected),
                got: truncate(got),
            },
            RefuseReason::ProtocolViolation { detail } => RefuseReason::ProtocolViolation {
                detail: truncate(detail),
            },
            other => other,
        }
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_REASON_TEXT {
        let mut end = MAX_REASON_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// 32-byte values as 64 lowercase hex digits: readable in captures and
/// a third the size of serde's default array of numbers.
mod hex32 {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in v {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(D::Error::custom("expected 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = digit(pair[0]).ok_or_else(|| D::Error::custom("bad hex digit"))?;
            let lo = digit(pair[1]).ok_or_else(|| D::Error::custom("bad hex digit"))?;
            out[i] = hi << 4 | lo;
        }
        Ok(out)
    }

    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn roundtrip(m: &LinkMessage) {
        let text = serde_json::to_string(m).unwrap();
        let back: LinkMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(&back, m, "{text}");
    }

    #[test]
    fn every_message_roundtrips() {
        let mut nonce = [0u8; 32];
        nonce[0] = 0xab;
        nonce[31] = 0x01;
        roundtrip(&LinkMessage::Hello {
            proto: 1,
            cluster: "prod".into(),
            name: "node-a".into(),
            incarnation: u64::MAX,
            nonce,
            key: [0xfe; 32],
        });
        roundtrip(&LinkMessage::Proof { mac: [7; 32] });
        for reason in [
            RefuseReason::Incompatible {
                expected: 1,
                got: 2,
            },
            RefuseReason::WrongCluster {
                expected: "a".into(),
                got: "b".into(),
            },
            RefuseReason::SelfConnect,
            RefuseReason::BadProof,
            RefuseReason::violation("x"),
            RefuseReason::TimedOut,
        ] {
            roundtrip(&LinkMessage::Refuse { reason });
        }
        roundtrip(&LinkMessage::App {
            body: json!({"raft": [1, 2]}),
        });
    }

    #[test]
    fn wire_shape_is_stable() {
        let m = LinkMessage::Proof { mac: [0xff; 32] };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"type": "proof", "mac": "ff".repeat(32)})
        );
        let m = LinkMessage::Refuse {
            reason: RefuseReason::BadProof,
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"type": "refuse", "reason": {"kind": "bad_proof"}})
        );
    }

    #[test]
    fn unknown_tags_and_extra_fields_are_tolerated() {
        let m: LinkMessage = serde_json::from_value(json!({"type": "gossip", "x": 1})).unwrap();
        assert_eq!(m, LinkMessage::Unknown);
        let m: LinkMessage =
            serde_json::from_value(json!({"type": "refuse", "reason": {"kind": "new_thing"}}))
                .unwrap();
        assert_eq!(
            m,
            LinkMessage::Refuse {
                reason: RefuseReason::Other
            }
        );
        // A future Hello with more fields still parses, so the version check runs.
        let m: LinkMessage = serde_json::from_value(json!({
            "type": "hello", "proto": 9, "cluster": "c", "name": "n",
            "incarnation": 5, "nonce": "00".repeat(32), "features": ["x"]
        }))
        .unwrap();
        assert!(matches!(m, LinkMessage::Hello { proto: 9, .. }));
    }

    #[test]
    fn bad_hex_is_refused() {
        for bad in [
            "00",
            &"zz".repeat(32),
            &"0".repeat(65),
            "é".repeat(32).as_str(),
        ] {
            let r: Result<LinkMessage, _> =
                serde_json::from_value(json!({"type": "proof", "mac": bad}));
            assert!(r.is_err(), "{bad}");
        }
        let m: LinkMessage =
            serde_json::from_value(json!({"type": "proof", "mac": "AB".repeat(32)})).unwrap();
        assert_eq!(m, LinkMessage::Proof { mac: [0xab; 32] });
    }

    #[test]
    fn bounded_cuts_long_text() {
        let r = RefuseReason::violation("é".repeat(500)).bounded();
        let RefuseReason::ProtocolViolation { detail } = r else {
            panic!()
        };
        assert!(detail.len() <= MAX_REASON_TEXT + 3);
    }
}
