//! The on-disk record format of the segment log.
//!
//! Every record is `len: u32 | crc32: u32 | kind: u8 | payload`, little
//! endian, where `len` counts `kind` and `payload` and the CRC covers the
//! same bytes. A record that is cut short or fails its CRC marks the end
//! of what a crash left intact: nothing after it was ever acknowledged.

use super::{Envelope, QueueId, RcptState, Recipient};

/// Bytes before the kind byte: length and CRC.
pub const HEADER_LEN: usize = 8;
/// Largest record accepted when reading, so a corrupt length cannot make
/// recovery allocate without bound.
pub const MAX_RECORD: usize = 1 << 31;

const KIND_STORE: u8 = 1;
const KIND_UPDATE: u8 = 2;
const KIND_REMOVE: u8 = 3;
/// A Store whose envelope names shadow holders. Written only when there
/// are holders, so a spool without replication stays readable by a
/// version that knows only `KIND_STORE`.
const KIND_STORE_HOLDERS: u8 = 4;
/// The shadow holders of a stored message, replacing those it had.
const KIND_HOLDERS: u8 = 5;
/// Stored in place of an attempt count for a finished recipient.
const DONE: u32 = u32::MAX;

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A new message; the content starts at `body_offset` within the record.
    Store {
        /// The envelope as stored.
        envelope: Envelope,
        /// Offset of the content from the start of the record.
        body_offset: usize,
        /// Length of the content.
        body_len: usize,
    },
    /// Some recipients changed state.
    Update {
        /// The message.
        id: QueueId,
        /// (recipient index, new state)
        changes: Vec<(usize, RcptState)>,
    },
    /// The message is finished and forgotten.
    Remove {
        /// The message.
        id: QueueId,
    },
    /// The message's shadow holders are now these.
    Holders {
        /// The message.
        id: QueueId,
        /// Node ids.
        holders: Vec<u64>,
    },
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

fn state_word(state: &RcptState) -> u32 {
    match state {
        RcptState::Pending { attempts } => (*attempts).min(DONE - 1),
        RcptState::Done => DONE,
    }
}

fn word_state(word: u32) -> RcptState {
    if word == DONE {
        RcptState::Done
    } else {
        RcptState::Pending { attempts: word }
    }
}

/// Start a record: reserve the header, write the kind.
fn begin(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.push(kind);
    start
}

/// Finish a record begun at `start`: fill in length and CRC.
fn finish(out: &mut [u8], start: usize) {
    let body = &out[start + HEADER_LEN..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Append a Store record; returns the offset of the content within `out`.
pub fn encode_store(out: &mut Vec<u8>, envelope: &Envelope, body: &[u8]) -> usize {
    let kind = match envelope.holders.is_empty() {
        true => KIND_STORE,
        false => KIND_STORE_HOLDERS,
    };
    let start = begin(out, kind);
    put_u64(out, envelope.id.0);
    put_u64(out, envelope.arrived_ms);
    put_str(out, &envelope.sender);
    put_u32(out, envelope.recipients.len() as u32);
    for r in &envelope.recipients {
        put_str(out, &r.address);
        put_u32(out, state_word(&r.state));
    }
    if kind == KIND_STORE_HOLDERS {
        put_holders(out, &envelope.holders);
    }
    put_u64(out, body.len() as u64);
    let body_at = out.len();
    out.extend_from_slice(body);
    finish(out, start);
    body_at
}

/// Append an Update record.
pub fn encode_update(out: &mut Vec<u8>, id: QueueId, changes: &[(usize, RcptState)]) {
    let start = begin(out, KIND_UPDATE);
    put_u64(out, id.0);
    put_u32(out, changes.len() as u32);
    for (index, state) in changes {
        put_u32(out, *index as u32);
        put_u32(out, state_word(state));
    }
    finish(out, start);
}

/// Append a Holders record.
pub fn encode_holders(out: &mut Vec<u8>, id: QueueId, holders: &[u64]) {
    let start = begin(out, KIND_HOLDERS);
    put_u64(out, id.0);
    put_holders(out, holders);
    finish(out, start);
}

fn put_holders(out: &mut Vec<u8>, holders: &[u64]) {
    put_u32(out, holders.len() as u32);
    for h in holders {
        put_u64(out, *h);
    }
}

/// Append a Remove record.
pub fn encode_remove(out: &mut Vec<u8>, id: QueueId) {
    let start = begin(out, KIND_REMOVE);
    put_u64(out, id.0);
    finish(out, start);
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the record needs: a torn tail.
    Truncated,
    /// The CRC or the structure is wrong.
    Corrupt(&'static str),
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(DecodeError::Corrupt("length"))?;
        let s = self
            .buf
            .get(self.at..end)
            .ok_or(DecodeError::Corrupt("short field"))?;
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn holders(&mut self) -> Result<Vec<u64>, DecodeError> {
        let n = self.u32()? as usize;
        // A cluster has at most 9 nodes; anything near this is corrupt.
        if n > 255 {
            return Err(DecodeError::Corrupt("holders"));
        }
        (0..n).map(|_| self.u64()).collect()
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Corrupt("utf-8"))
    }
}

/// Decode the record at the start of `buf`; returns it and its total size.
pub fn decode(buf: &[u8]) -> Result<(Record, usize), DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_RECORD {
        return Err(DecodeError::Corrupt("length"));
    }
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Err(DecodeError::Truncated);
    }
    let body = &buf[HEADER_LEN..total];
    if crc32fast::hash(body) != crc {
        return Err(DecodeError::Corrupt("checksum"));
    }
    let mut c = Cursor { buf: body, at: 1 };
    let record = match body[0] {
        kind @ (KIND_STORE | KIND_STORE_HOLDERS) => {
            let id = QueueId(c.u64()?);
            let arrived_ms = c.u64()?;
            let sender = c.string()?;
            let n = c.u32()? as usize;
            let mut recipients = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                let address = c.string()?;
                let state = word_state(c.u32()?);
                recipients.push(Recipient { address, state });
            }
            let holders = match kind {
                KIND_STORE_HOLDERS => c.holders()?,
                _ => Vec::new(),
            };
            let body_len = c.u64()? as usize;
            let body_offset = HEADER_LEN + c.at;
            c.take(body_len)?;
            Record::Store {
                envelope: Envelope {
                    id,
                    sender,
                    recipients,
                    arrived_ms,
                    holders,
                },
                body_offset,
                body_len,
            }
        }
        KIND_UPDATE => {
            let id = QueueId(c.u64()?);
            let n = c.u32()? as usize;
            let mut changes = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                let index = c.u32()? as usize;
                changes.push((index, word_state(c.u32()?)));
            }
            Record::Update { id, changes }
        }
        KIND_REMOVE => Record::Remove {
            id: QueueId(c.u64()?),
        },
        KIND_HOLDERS => Record::Holders {
            id: QueueId(c.u64()?),
            holders: c.holders()?,
        },
        _ => return Err(DecodeError::Corrupt("kind")),
    };
    if c.at != body.len() {
        return Err(DecodeError::Corrupt("trailing bytes"));
    }
    Ok((record, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            id: QueueId(42),
            sender: "a@example.test".into(),
            recipients: vec![
                Recipient {
                    address: "b@dest.example".into(),
                    state: RcptState::Pending { attempts: 3 },
                },
                Recipient {
                    address: "c@dest.example".into(),
                    state: RcptState::Done,
                },
            ],
            arrived_ms: 1_700_000_000_000,
            holders: Vec::new(),
        }
    }

    #[test]
    fn store_round_trips_and_locates_the_body() {
        let mut buf = b"prefix".to_vec();
        let at = encode_store(&mut buf, &envelope(), b"Subject: x\r\n\r\nhi\r\n");
        let (rec, size) = decode(&buf[6..]).unwrap();
        assert_eq!(size, buf.len() - 6);
        match rec {
            Record::Store {
                envelope: e,
                body_offset,
                body_len,
            } => {
                assert_eq!(e, envelope());
                assert_eq!(6 + body_offset, at);
                assert_eq!(&buf[at..at + body_len], b"Subject: x\r\n\r\nhi\r\n");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn update_and_remove_round_trip() {
        let mut buf = Vec::new();
        let changes = vec![
            (1, RcptState::Done),
            (0, RcptState::Pending { attempts: 1 }),
        ];
        encode_update(&mut buf, QueueId(7), &changes);
        encode_remove(&mut buf, QueueId(7));
        let (a, n) = decode(&buf).unwrap();
        assert_eq!(
            a,
            Record::Update {
                id: QueueId(7),
                changes
            }
        );
        let (b, m) = decode(&buf[n..]).unwrap();
        assert_eq!(b, Record::Remove { id: QueueId(7) });
        assert_eq!(n + m, buf.len());
    }

    #[test]
    fn holders_round_trip_and_a_store_without_keeps_the_old_kind() {
        let mut plain = Vec::new();
        encode_store(&mut plain, &envelope(), b"x");
        assert_eq!(plain[HEADER_LEN], KIND_STORE, "readable by older versions");
        let mut e = envelope();
        e.holders = vec![0xAB, u64::MAX];
        let mut buf = Vec::new();
        encode_store(&mut buf, &e, b"body");
        encode_holders(&mut buf, e.id, &[7]);
        let (a, n) = decode(&buf).unwrap();
        match a {
            Record::Store {
                envelope,
                body_offset,
                body_len,
            } => {
                assert_eq!(envelope, e);
                assert_eq!(&buf[body_offset..body_offset + body_len], b"body");
            }
            other => panic!("{other:?}"),
        }
        let (b, _) = decode(&buf[n..]).unwrap();
        assert_eq!(
            b,
            Record::Holders {
                id: e.id,
                holders: vec![7]
            }
        );
    }

    #[test]
    fn every_truncation_is_detected() {
        let mut buf = Vec::new();
        encode_store(&mut buf, &envelope(), b"body\r\n");
        for cut in 0..buf.len() {
            assert_eq!(
                decode(&buf[..cut]),
                Err(DecodeError::Truncated),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let mut buf = Vec::new();
        encode_store(&mut buf, &envelope(), b"body\r\n");
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }
}
