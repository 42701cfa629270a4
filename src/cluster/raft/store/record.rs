//! On-disk framing shared by the cluster log, meta and snapshot files.
//!
//! A frame is `len: u32 LE | crc32(payload): u32 LE | payload`. A crash in the
//! middle of an append leaves a short or mismatching frame at the tail; the
//! reader stops there, so a torn write is dropped and never misread.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Bytes before each payload.
pub const HEADER: usize = 8;

/// Larger "lengths" are garbage from a torn header, not a real frame: cluster
/// log entries and snapshots are a few KiB.
const MAX_FRAME: usize = 64 << 20;

/// Appends one frame holding `payload` to `buf`.
pub fn encode_into(buf: &mut Vec<u8>, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

/// The outcome of scanning a buffer of frames.
pub struct Scan<'a> {
    /// Payloads of the intact frames, in order.
    pub frames: Vec<&'a [u8]>,
    /// Bytes covered by intact frames; anything after is a torn tail.
    pub valid_len: usize,
}

/// Splits `buf` into frames, stopping at the first short or corrupt one.
pub fn scan(buf: &[u8]) -> Scan<'_> {
    let mut frames = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= HEADER {
        let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let start = pos + HEADER;
        if len > MAX_FRAME || buf.len() - start < len {
            break;
        }
        let payload = &buf[start..start + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        frames.push(payload);
        pos = start + len;
    }
    Scan {
        frames,
        valid_len: pos,
    }
}

/// Makes a directory entry change (create, rename) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `dir/name` with `bytes` atomically: after a crash the file holds
/// either the old or the new content, never a mix.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Reads `dir/name`, or `None` when it does not exist.
pub fn read_optional(dir: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    match fs::read(dir.join(name)) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_torn_tail() {
        let mut buf = Vec::new();
        encode_into(&mut buf, b"one");
        encode_into(&mut buf, b"");
        encode_into(&mut buf, b"three");
        let full = scan(&buf);
        assert_eq!(full.frames, vec![&b"one"[..], b"", b"three"]);
        assert_eq!(full.valid_len, buf.len());
        let first_two = HEADER * 2 + 3;
        // Every cut inside the last frame drops exactly that frame.
        for cut in first_two..buf.len() {
            let s = scan(&buf[..cut]);
            assert_eq!(s.frames.len(), 2, "cut at {cut}");
            assert_eq!(s.valid_len, first_two);
        }
    }

    #[test]
    fn corrupt_payload_stops_the_scan() {
        let mut buf = Vec::new();
        encode_into(&mut buf, b"good");
        encode_into(&mut buf, b"flipped");
        let last = buf.len() - 1;
        buf[last] ^= 0x40;
        let s = scan(&buf);
        assert_eq!(s.frames, vec![&b"good"[..]]);
        assert_eq!(s.valid_len, HEADER + 4);
    }

    #[test]
    fn write_atomic_replaces() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "f", b"old").unwrap();
        write_atomic(dir.path(), "f", b"new").unwrap();
        assert_eq!(
            read_optional(dir.path(), "f").unwrap().as_deref(),
            Some(&b"new"[..])
        );
        assert!(read_optional(dir.path(), "missing").unwrap().is_none());
        assert!(!dir.path().join("f.tmp").exists());
    }
}
