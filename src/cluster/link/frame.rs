//! Framing for the node-to-node link: a `u32` big-endian payload length,
//! then the payload: one serde_json message during the handshake, its
//! sealed form after (see [`super::seal`]).
//!
//! The decoder is pure and incremental so the same code serves real sockets
//! and in-memory tests, and so that input split anywhere decodes the same.
//! A peer (even an authenticated, buggy one) can never make it allocate more
//! than its cap: the length is checked as soon as the 4 header bytes are in,
//! before any payload is buffered.

use bytes::{Buf, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Largest message on an established link (its sealed payload is
/// [`super::seal::TAG_LEN`] bytes longer).
pub const MAX_FRAME: usize = 16 << 20;
/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The announced (or, when encoding, actual) payload length exceeds the cap.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The payload length.
        len: u64,
        /// The cap in force.
        max: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A sealed frame did not open: altered, replayed, reordered, or not
    /// sealed by the peer at all.
    #[error("frame failed authentication (altered, replayed or not from the peer)")]
    Forged,
    /// A previous error ended this stream; nothing more is decoded.
    #[error("stream already failed")]
    Poisoned,
}

/// Encodes `msg` as one frame, refusing one the peer would refuse as too large.
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    encode_with_max(msg, MAX_FRAME)
}

/// Like [`encode`] with an explicit cap.
pub fn encode_with_max<T: Serialize>(msg: &T, max: usize) -> Result<Bytes, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut buf, msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - HEADER_LEN;
    if len > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    // Cannot truncate: `max` fits u32 in every real use, and len <= max.
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len: len as u64,
        max,
    })?;
    buf[..HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
    Ok(Bytes::from(buf))
}

/// Incremental frame decoder: [`feed`](Self::feed) bytes, take complete frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
    failed: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder refusing payloads longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
            failed: false,
        }
    }

    /// Changes the cap (e.g. raised once the peer is authenticated).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Appends received bytes. After an error the input is dropped, so a
    /// failed stream cannot grow the buffer.
    pub fn feed(&mut self, data: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(data);
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame payload, `None` if more input is needed.
    /// Any error is final: the stream cannot be resynchronised.
    pub fn next_frame(&mut self) -> Result<Option<BytesMut>, FrameError> {
        if self.failed {
            return Err(FrameError::Poisoned);
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        // Checked before the payload is waited for, so an absurd length
        // costs nothing but the 4 bytes already read.
        if u64::from(len) > self.max as u64 {
            return Err(self.fail(FrameError::TooLarge {
                len: u64::from(len),
                max: self.max,
            }));
        }
        let len = len as usize;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        Ok(Some(self.buf.split_to(len)))
    }

    /// The next complete frame parsed as a `T`, `None` if more input is needed.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(payload) = self.next_frame()? else {
            return Ok(None);
        };
        match serde_json::from_slice(&payload) {
            Ok(msg) => Ok(Some(msg)),
            Err(e) => Err(self.fail(FrameError::Malformed(e.to_string()))),
        }
    }

    /// Ends the stream with `e`: a frame that decoded could not be used.
    pub fn fail(&mut self, e: FrameError) -> FrameError {
        self.failed = true;
        self.buf = BytesMut::new();
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Msg {
        n: u32,
        s: String,
    }

    fn msg_strategy() -> impl Strategy<Value = Msg> {
        (any::<u32>(), ".{0,40}").prop_map(|(n, s)| Msg { n, s })
    }

    #[test]
    fn roundtrip_one_frame() {
        let m = Msg {
            n: 7,
            s: "hé".into(),
        };
        let bytes = encode(&m).unwrap();
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        let mut d = FrameDecoder::default();
        d.feed(&bytes);
        assert_eq!(d.next_message::<Msg>().unwrap(), Some(m));
        assert_eq!(d.next_message::<Msg>().unwrap(), None);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut d = FrameDecoder::new(1024);
        d.feed(&1025u32.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: 1025,
                max: 1024
            })
        );
        // Poisoned: nothing more is buffered or decoded.
        d.feed(&[0; 100]);
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.next_frame(), Err(FrameError::Poisoned));
    }

    #[test]
    fn max_u32_length_does_not_allocate() {
        let mut d = FrameDecoder::default();
        d.feed(&u32::MAX.to_be_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn exactly_max_is_accepted() {
        let mut d = FrameDecoder::new(3);
        d.feed(&[0, 0, 0, 3, b'1', b'2', b'3']);
        assert_eq!(d.next_frame().unwrap().unwrap(), &b"123"[..]);
    }

    #[test]
    fn truncated_frame_waits_for_more() {
        let bytes = encode(&Msg {
            n: 1,
            s: "x".into(),
        })
        .unwrap();
        let mut d = FrameDecoder::default();
        d.feed(&bytes[..bytes.len() - 1]);
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn malformed_payload_is_an_error() {
        let mut d = FrameDecoder::default();
        d.feed(&[0, 0, 0, 0]);
        assert!(matches!(
            d.next_message::<Msg>(),
            Err(FrameError::Malformed(_))
        ));
        let mut d = FrameDecoder::default();
        d.feed(&[0, 0, 0, 2, b'{', b'}']);
        assert!(matches!(
            d.next_message::<Msg>(),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn encode_refuses_oversized() {
        let m = Msg {
            n: 1,
            s: "x".repeat(100),
        };
        assert!(matches!(
            encode_with_max(&m, 50),
            Err(FrameError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512),
                                    cuts in proptest::collection::vec(any::<usize>(), 0..8),
                                    max in 0usize..300) {
            let mut d = FrameDecoder::new(max);
            let mut pos = 0;
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(data.len());
            for cut in cuts {
                d.feed(&data[pos..cut]);
                pos = cut;
                while let Ok(Some(_)) = d.next_message::<serde_json::Value>() {}
                // Never more buffered than one maximal frame plus what was just fed.
                prop_assert!(d.buffered() <= HEADER_LEN + max + data.len());
            }
        }

        #[test]
        fn any_split_decodes_the_same(msgs in proptest::collection::vec(msg_strategy(), 0..6),
                                      cuts in proptest::collection::vec(any::<usize>(), 0..10)) {
            let mut wire = Vec::new();
            for m in &msgs {
                wire.extend_from_slice(&encode(m).unwrap());
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(wire.len());
            let mut d = FrameDecoder::default();
            let mut got = Vec::new();
            let mut pos = 0;
            for cut in cuts {
                d.feed(&wire[pos..cut]);
                pos = cut;
                while let Some(m) = d.next_message::<Msg>().unwrap() {
                    got.push(m);
                }
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(d.buffered(), 0);
        }
    }
}
