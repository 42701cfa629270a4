//! Sealing of an established link's frames, so that only the two ends of
//! the connection can read or write them.
//!
//! Each direction has its own ChaCha20-Poly1305 key, derived with
//! HKDF-SHA256 from the cluster secret (salt), the connection's X25519
//! shared secret (input) and the handshake transcript (info). The nonce is
//! the count of frames sent before in that direction, so a frame that is
//! altered, dropped, repeated, reordered or taken from another connection
//! fails to open; and the length header is authenticated too. The
//! ephemeral X25519 keys give forward secrecy: a secret leaked later does
//! not open traffic recorded before.
//!
//! A sealed frame is the usual `u32` length header, then the ciphertext of
//! one JSON message, then the 16-byte tag.

use bytes::{Bytes, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};

use super::frame::{FrameDecoder, FrameError, HEADER_LEN, MAX_FRAME};
use super::handshake::Role;
use super::message::LinkMessage;
use crate::cluster::identity::Secret;

/// Bytes the tag adds to each frame.
pub const TAG_LEN: usize = 16;
/// Largest sealed payload: the largest message plus its tag.
pub const MAX_SEALED_FRAME: usize = MAX_FRAME + TAG_LEN;
/// Domain separation for key derivation.
const KEY_LABEL: &[u8] = b"mtad-cluster-v2 keys";

/// The keys of one end of an established link.
#[derive(Debug)]
pub struct Keys {
    /// Seals what this end sends.
    pub send: Sealer,
    /// Opens what this end receives.
    pub recv: Opener,
}

/// Derives the keys of the end in `role`; the peer derives the same two,
/// swapped.
pub fn keys(secret: &Secret, shared: &[u8], transcript: &[u8; 32], role: Role) -> Keys {
    let prk = Salt::new(HKDF_SHA256, secret.expose()).extract(shared);
    let key = |direction: u8| {
        let info = [KEY_LABEL, &[direction], transcript];
        // 32 bytes is far below HKDF's limit of 255 hashes: cannot fail.
        let okm = prk
            .expand(&info, &CHACHA20_POLY1305)
            .expect("HKDF output of one key");
        LessSafeKey::new(UnboundKey::from(okm))
    };
    // Each direction is named by the role of its sender.
    Keys {
        send: Sealer {
            key: key(role.byte()),
            count: 0,
        },
        recv: Opener {
            key: key(role.other().byte()),
            count: 0,
            failed: false,
        },
    }
}

/// The nonce for the frame with this count.
fn nonce(count: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[NONCE_LEN - 8..].copy_from_slice(&count.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals outgoing frames, in order.
pub struct Sealer {
    key: LessSafeKey,
    count: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({} sent)", self.count)
    }
}

impl Sealer {
    /// One sealed frame carrying `msg`; refused (nothing counted) when the
    /// message is larger than the peer accepts.
    pub fn seal(&mut self, msg: &LinkMessage) -> Result<Bytes, FrameError> {
        let mut buf = vec![0u8; HEADER_LEN];
        serde_json::to_writer(&mut buf, msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
        self.seal_in(buf)
    }

    /// One sealed frame carrying these bytes as they are.
    pub fn seal_payload(&mut self, payload: &[u8]) -> Result<Bytes, FrameError> {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
        buf.extend_from_slice(&[0; HEADER_LEN]);
        buf.extend_from_slice(payload);
        self.seal_in(buf)
    }

    /// Seals `buf` (header room, then the payload) in place.
    fn seal_in(&mut self, mut buf: Vec<u8>) -> Result<Bytes, FrameError> {
        let len = buf.len() - HEADER_LEN;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: MAX_FRAME,
            });
        }
        // Fits: MAX_SEALED_FRAME is far below u32::MAX.
        let header = ((len + TAG_LEN) as u32).to_be_bytes();
        buf[..HEADER_LEN].copy_from_slice(&header);
        let count = self.next()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(count), Aad::from(header), &mut buf[HEADER_LEN..])
            .map_err(|_| FrameError::Malformed("sealing failed".into()))?;
        buf.extend_from_slice(tag.as_ref());
        Ok(Bytes::from(buf))
    }

    fn next(&mut self) -> Result<u64, FrameError> {
        let count = self.count;
        // 2^64 frames would take centuries; a link never reuses a nonce.
        self.count = count
            .checked_add(1)
            .ok_or_else(|| FrameError::Malformed("link nonces exhausted".into()))?;
        Ok(count)
    }
}

/// Opens incoming frames, in order.
pub struct Opener {
    key: LessSafeKey,
    count: u64,
    /// A frame failed to open or parse: the stream is over.
    failed: bool,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opener({} received)", self.count)
    }
}

impl Opener {
    /// The next complete message from `dec`, `None` if more input is
    /// needed. Any error is final, as the decoder's are.
    pub fn next(&mut self, dec: &mut FrameDecoder) -> Result<Option<LinkMessage>, FrameError> {
        let Some(frame) = dec.next_frame()? else {
            return Ok(None);
        };
        // A peer that could not verify our proof refuses in the clear,
        // and that can only be its first frame after its proof; kept to
        // tell it from a forgery (either way the link ends).
        let first = (self.count == 0).then(|| frame.clone());
        let opened = self.open(frame).and_then(|plain| {
            serde_json::from_slice(&plain).map_err(|e| FrameError::Malformed(e.to_string()))
        });
        match (opened, first) {
            (Ok(msg), _) => Ok(Some(msg)),
            (Err(FrameError::Forged), Some(first)) => match serde_json::from_slice(&first) {
                Ok(refusal @ LinkMessage::Refuse { .. }) => Ok(Some(refusal)),
                _ => Err(dec.fail(FrameError::Forged)),
            },
            (Err(e), _) => Err(dec.fail(e)),
        }
    }

    /// The plaintext of one sealed frame payload (header already taken),
    /// opened in place.
    pub fn open(&mut self, mut frame: BytesMut) -> Result<BytesMut, FrameError> {
        if self.failed {
            return Err(FrameError::Poisoned);
        }
        // Counted only once opened; a failure ends the stream.
        self.failed = true;
        if frame.len() < TAG_LEN || frame.len() > MAX_SEALED_FRAME {
            return Err(FrameError::Forged);
        }
        // The decoder took exactly `frame.len()` from the header.
        let header = (frame.len() as u32).to_be_bytes();
        let len = self
            .key
            .open_in_place(nonce(self.count), Aad::from(header), &mut frame)
            .map_err(|_| FrameError::Forged)?
            .len();
        self.count = self.count.checked_add(1).ok_or(FrameError::Forged)?;
        self.failed = false;
        frame.truncate(len);
        Ok(frame)
    }
}

#[cfg(test)]
#[path = "seal_tests.rs"]
mod tests;
