//! The shadow service's calls: a primary (the node that said "250" for a
//! message) copies each message it accepts to other members before it
//! answers, and tells them as its recipients are done, so that a member
//! can take the message over if the primary is lost for good.
//!
//! The primary is always the authenticated caller, never a field: a node
//! can store and change only its own shadows.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::cluster::state::NodeId;

/// Most content one call carries: its base64 form and the envelope must
/// fit one link frame (16 MiB). Larger messages go in parts first.
pub const MAX_SHADOW_PART: usize = 8 << 20;

/// A shadow call, from a primary to one of its holders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShadowRequest {
    /// Keep a copy of this message durably; answered once it is on disk.
    Store {
        /// The message.
        message: ShadowMessage,
    },
    /// The next part of a large message's content, ahead of its `Store`
    /// (which carries the rest): held in memory until then.
    Part {
        /// The message's queue id.
        id: u64,
        /// Where the part starts in the content: 0 starts over.
        offset: u64,
        /// The part (base64 on the wire).
        #[serde(with = "base64_bytes")]
        bytes: Bytes,
    },
    /// Recipients delivered, bounced or expired, and messages finished
    /// (or deleted), batched.
    Progress {
        /// (queue id, indexes of recipients now done).
        done: Vec<(u64, Vec<u32>)>,
        /// Queue ids of messages to forget.
        removed: Vec<u64>,
    },
    /// The primary's word on what this holder should keep of it: every
    /// shadow below `below` that is not in `keep` is forgotten (newer
    /// ones may be copies still on their way to the primary's list).
    Reconcile {
        /// Queue ids, sorted.
        keep: Vec<u64>,
        /// No shadow at or above this id is discarded.
        below: u64,
    },
}

/// One message as its primary has it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowMessage {
    /// Its queue id on the primary.
    pub id: u64,
    /// Reverse path; empty for `<>`.
    pub sender: String,
    /// Forward paths, with whether each is done.
    pub recipients: Vec<ShadowRecipient>,
    /// When the primary accepted it, in ms since the Unix epoch.
    pub arrived_ms: u64,
    /// Bytes of the content sent before in `Part`s; `body` is the rest.
    #[serde(default)]
    pub staged: u64,
    /// The primary's delivery epoch as it knows it: a holder keeps the
    /// copy only if that epoch is live and the primary's there (so a copy
    /// from before a takeover never lands after it).
    #[serde(default)]
    pub epoch: u64,
    /// The content, or its tail after `staged` bytes (base64 on the wire;
    /// the link encrypts it).
    #[serde(with = "base64_bytes")]
    pub body: Bytes,
}

impl std::fmt::Debug for ShadowMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The content is mail: never in a log line.
        f.debug_struct("ShadowMessage")
            .field("id", &format_args!("{:016X}", self.id))
            .field("recipients", &self.recipients.len())
            .field("staged", &self.staged)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// One recipient of a shadowed message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowRecipient {
    /// The address.
    pub address: String,
    /// Delivered, bounced or expired already.
    pub done: bool,
}

/// The answer to a [`ShadowRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShadowReply {
    /// The copy is durable.
    Stored,
    /// The part is held until the message's `Store`.
    Staged,
    /// The progress is recorded.
    Applied,
    /// Reconciled: this many shadows were forgotten.
    Reconciled {
        /// How many.
        discarded: u64,
    },
    /// Not done (a full disk, an fsync error, not a member that keeps
    /// copies); the text says why.
    Failed(String),
}

/// What answers shadow calls on a node (mtad's holder side, above the
/// cluster).
pub trait ShadowHandler: Send + Sync + 'static {
    /// Answer `req` from the primary `from` (the link's authenticated
    /// incarnation).
    fn handle(&self, from: NodeId, req: ShadowRequest) -> BoxFuture<'static, ShadowReply>;
}

/// Message content as base64 in the JSON frame. Not `base64ct`: its
/// constant-time decoding (made for secrets) was 7 % of a holder's CPU.
mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::rpc::{Envelope, Request};

    #[test]
    fn a_store_round_trips_through_the_link_encoding_with_any_bytes() {
        let message = ShadowMessage {
            id: 0x0123_4567_89AB_CDEF,
            sender: String::new(),
            recipients: vec![ShadowRecipient {
                address: "b@dest.example".into(),
                done: false,
            }],
            arrived_ms: 1,
            staged: 0,
            epoch: 0,
            body: (0..=255u8).collect(),
        };
        let call = Envelope::Call {
            id: 1,
            request: Request::Shadow(ShadowRequest::Store {
                message: message.clone(),
            }),
        };
        let value = serde_json::to_value(&call).unwrap();
        match serde_json::from_value(value).unwrap() {
            Envelope::Call {
                request: Request::Shadow(ShadowRequest::Store { message: back }),
                ..
            } => assert_eq!(back, message),
            other => panic!("{other:?}"),
        }
        // The log shows sizes, not mail.
        let debug = format!("{message:?}");
        assert!(debug.contains("body_len: 256"), "{debug}");
        // The largest part fits a frame, envelope and all.
        let part = Envelope::Call {
            id: u64::MAX,
            request: Request::Shadow(ShadowRequest::Part {
                id: u64::MAX,
                offset: u64::MAX,
                bytes: Bytes::from(vec![0xFF; MAX_SHADOW_PART]),
            }),
        };
        let frame = crate::cluster::link::frame::encode(&part).unwrap();
        assert!(
            frame.len() < crate::cluster::link::frame::MAX_FRAME,
            "{}",
            frame.len()
        );
    }
}
