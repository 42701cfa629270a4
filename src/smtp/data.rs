//! Strict receiver for the content after DATA.
//!
//! Only CRLF "." CRLF ends the content. Any bare LF or lone CR is treated
//! as an SMTP smuggling attempt: we still read to the real terminator (so
//! the session stays in sync) but reject the message. smtp_proto's receiver
//! is lenient about exactly these cases, hence our own.

use bytes::Bytes;

use super::memory::Charge;

/// How the content ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataOutcome {
    /// Content complete: dot-unstuffed, CRLF endings, without the final ".".
    Complete(Bytes),
    /// A bare CR or LF appeared somewhere in the content.
    BareLineEnding,
    /// The content exceeded the size limit.
    TooBig,
    /// The node's memory for message bodies ran out while it came in.
    NoMemory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (right after CRLF, or of the content).
    LineStart,
    /// Inside a line.
    Mid,
    /// Inside a line, just after a CR.
    Cr,
    /// A line that began with ".".
    Dot,
    /// A line that began with ".", then CR.
    DotCr,
}

/// Accumulates one message's content across any number of reads.
#[derive(Debug)]
pub struct DataReceiver {
    body: Vec<u8>,
    /// Unstuffed content bytes seen, kept even after the body is dropped.
    size: u64,
    max: u64,
    bare: bool,
    /// What the body holds of the node's memory; None: not counted.
    charge: Option<Charge>,
    /// The charge could not grow: the content is dropped as it comes.
    starved: bool,
    state: State,
}

impl DataReceiver {
    /// A receiver that refuses content larger than `max` bytes.
    pub fn new(max: u64) -> Self {
        Self {
            body: Vec::new(),
            size: 0,
            max,
            bare: false,
            charge: None,
            starved: false,
            state: State::LineStart,
        }
    }

    /// The smallest allocation for a body.
    pub const FIRST_STEP: u64 = 4096;
    /// Rounding of the last-resort step when a larger one does not fit.
    const STEP: usize = 64 * 1024;

    /// Counts the body's memory against `charge`, which must cover every
    /// byte it allocates.
    pub fn counted(mut self, charge: Charge) -> Self {
        self.charge = Some(charge);
        self
    }

    /// The charge for the finished body, to keep until it is stored.
    pub fn take_charge(&mut self) -> Option<Charge> {
        self.charge.take()
    }

    /// Whether content is still worth keeping.
    fn keeping(&self) -> bool {
        !self.bare && !self.starved && self.size <= self.max
    }

    fn push(&mut self, bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len() as u64);
        if !self.keeping() {
            // Rejected anyway: free the memory now rather than at the end.
            self.drop_body();
            return;
        }
        let need = self.body.len() + bytes.len();
        if need > self.body.capacity() && !self.grow(need) {
            self.starved = true;
            self.drop_body();
            return;
        }
        self.body.extend_from_slice(bytes);
    }

    /// Makes room for `need` bytes in all, in steps of half the capacity
    /// (less overdraw than doubling, few copies), never past the size
    /// limit; when the node's memory does not cover a step, the next
    /// 64 KiB will do. False when not even that is covered. Nothing is
    /// taken ahead of the content: a client that declares a large SIZE
    /// and then trickles holds no more than one that does not.
    fn grow(&mut self, need: usize) -> bool {
        let max = usize::try_from(self.max).unwrap_or(usize::MAX);
        let cap = self.body.capacity();
        let step = (cap + cap / 2).max(Self::FIRST_STEP as usize);
        let wanted = need.max(step.min(max));
        let least = need.next_multiple_of(Self::STEP).min(max).max(need);
        let Some(c) = &mut self.charge else {
            self.body.reserve_exact(wanted - self.body.len());
            return true;
        };
        for cap in [wanted, least] {
            if c.cover(cap as u64) {
                self.body.reserve_exact(cap - self.body.len());
                return true;
            }
        }
        false
    }

    fn drop_body(&mut self) {
        self.body = Vec::new();
        if let Some(c) = &mut self.charge {
            c.release();
        }
    }

    fn bare(&mut self) {
        self.bare = true;
        self.drop_body();
    }

    /// Consume `input`; returns how many bytes were used and, once the
    /// terminator has been read, the outcome. Bytes after the terminator
    /// are left for the caller.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<DataOutcome>) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::LineStart => {
                    if input[i] == b'.' {
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Mid => {
                    let rest = &input[i..];
                    match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
                        None => {
                            self.push(rest);
                            i = input.len();
                        }
                        Some(p) => {
                            self.push(&rest[..p]);
                            if rest[p] == b'\n' {
                                // Not a line start: "\n.\r\n" must not end the content.
                                self.bare();
                                self.push(b"\n");
                            } else {
                                self.state = State::Cr;
                            }
                            i += p + 1;
                        }
                    }
                }
                State::Cr => {
                    if input[i] == b'\n' {
                        self.push(b"\r\n");
                        self.state = State::LineStart;
                        i += 1;
                    } else {
                        // Lone CR; the next byte is ordinary content.
                        self.bare();
                        self.push(b"\r");
                        self.state = State::Mid;
                    }
                }
                State::Dot => {
                    if input[i] == b'\r' {
                        self.state = State::DotCr;
                        i += 1;
                    } else {
                        // Dot-stuffed line: the leading "." is dropped.
                        self.state = State::Mid;
                    }
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        return (i + 1, Some(self.finish()));
                    }
                    // ".\r" followed by something else: a lone CR.
                    self.bare();
                    self.push(b"\r");
                    self.state = State::Mid;
                }
            }
        }
        (input.len(), None)
    }

    fn finish(&mut self) -> DataOutcome {
        if self.bare {
            DataOutcome::BareLineEnding
        } else if self.size > self.max {
            DataOutcome::TooBig
        } else if self.starved {
            DataOutcome::NoMemory
        } else {
            DataOutcome::Complete(Bytes::from(std::mem::take(&mut self.body)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max: u64, input: &[u8]) -> (usize, Option<DataOutcome>) {
        DataReceiver::new(max).feed(input)
    }

    fn complete(body: &[u8]) -> Option<DataOutcome> {
        Some(DataOutcome::Complete(Bytes::copy_from_slice(body)))
    }

    #[test]
    fn simple_and_empty() {
        assert_eq!(run(100, b".\r\nNOOP"), (3, complete(b"")));
        assert_eq!(run(100, b"a\r\nb\r\n.\r\nX"), (9, complete(b"a\r\nb\r\n")));
    }

    #[test]
    fn dot_unstuffing() {
        let (_, out) = run(100, b"..a\r\n\r\n...\r\n.\r\n");
        assert_eq!(out, complete(b".a\r\n\r\n..\r\n"));
    }

    #[test]
    fn not_terminators() {
        for input in [&b"a\r\n.a\r\n"[..], b"a.\r\n", b"a\r\n. \r\n", b".."] {
            assert_eq!(run(100, input).1, None, "{input:?}");
        }
    }

    #[test]
    fn smuggling_variants_are_rejected_after_the_real_end() {
        for input in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n"[..],
            b"a\r\n.\nb\r\n.\r\n",
            b"a\n.\r\nb\r\n.\r\n",
            b"a\r.\rb\r\n.\r\n",
            b"a\rb\r\n.\r\n",
            b".\r.\r\n.\r\n",
            b"\n.\r\n\r\n.\r\n",
        ] {
            let (used, out) = run(100, input);
            assert_eq!(out, Some(DataOutcome::BareLineEnding), "{input:?}");
            assert_eq!(used, input.len());
        }
    }

    #[test]
    fn too_big_reads_to_the_end() {
        let mut input = b"x".repeat(50);
        input.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(run(52, &input).1, complete(&input[..52]));
        assert_eq!(run(51, &input).1, Some(DataOutcome::TooBig));
    }

    #[test]
    fn any_split_gives_the_same_result() {
        let input = b"..a\r\nb\r\r\n.\r\n";
        let whole = run(100, input);
        for split in 0..input.len() {
            let mut r = DataReceiver::new(100);
            let (n, out) = r.feed(&input[..split]);
            assert_eq!(n, split);
            assert!(out.is_none());
            assert_eq!(
                r.feed(&input[split..]),
                (input.len() - split, whole.1.clone())
            );
        }
    }

    #[test]
    fn the_body_is_counted_and_dropped_when_memory_runs_out() {
        use crate::smtp::memory::BodyMemory;
        use std::sync::Arc;
        let memory = Arc::new(BodyMemory::default());
        let mut line = b"y".repeat(998);
        line.extend_from_slice(b"\r\n");
        // Fits: the charge covers what the body holds, and stays with it.
        let mut r = DataReceiver::new(1 << 20).counted(Charge::new(memory.clone(), 8192));
        r.feed(&line);
        assert!(memory.used() >= 1000 && memory.used() <= 8192);
        let (_, out) = r.feed(b".\r\n");
        assert!(matches!(out, Some(DataOutcome::Complete(b)) if b.len() == 1000));
        let charge = r.take_charge();
        assert!(memory.used() >= 1000);
        drop(charge);
        assert_eq!(memory.used(), 0);

        // Does not fit: read to the end, nothing kept, everything given back.
        let mut r = DataReceiver::new(1 << 20).counted(Charge::new(memory.clone(), 8192));
        for _ in 0..20 {
            r.feed(&line);
            assert!(memory.used() <= 8192);
        }
        assert_eq!(memory.used(), 0);
        assert_eq!(r.feed(b".\r\n").1, Some(DataOutcome::NoMemory));

        // Too big wins over no memory: that one can never be sent.
        let mut r = DataReceiver::new(4000).counted(Charge::new(memory.clone(), 2048));
        for _ in 0..5 {
            r.feed(&line);
        }
        assert_eq!(r.feed(b".\r\n").1, Some(DataOutcome::TooBig));
        assert_eq!(memory.used(), 0);
    }

    #[test]
    fn the_body_never_holds_more_than_the_size_limit() {
        use crate::smtp::memory::BodyMemory;
        use std::sync::Arc;
        let memory = Arc::new(BodyMemory::default());
        let max = 10_000;
        let mut r = DataReceiver::new(max).counted(Charge::new(memory.clone(), max));
        let mut line = b"z".repeat(98);
        line.extend_from_slice(b"\r\n");
        for _ in 0..100 {
            r.feed(&line);
        }
        let (_, out) = r.feed(b".\r\n");
        assert!(matches!(out, Some(DataOutcome::Complete(b)) if b.len() == 10_000));
        assert!(memory.used() <= max, "{}", memory.used());
    }
}
