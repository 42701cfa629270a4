//! The handshake over byte pipes with the frame codec, split every way.

use super::*;

/// One side of a byte-level simulation: machine, decoder, bytes to send.
struct Wire {
    hs: Handshake,
    dec: FrameDecoder,
    events: Vec<Action>,
}

impl Wire {
    fn handle(&mut self, actions: Vec<Action>, out: &mut Vec<u8>) {
        for a in actions {
            match a {
                Action::Send(m) => out.extend_from_slice(&encode(&m).unwrap()),
                other => self.events.push(other),
            }
        }
    }

    fn receive(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.dec.feed(bytes);
        loop {
            match self.dec.next_message::<LinkMessage>() {
                Ok(Some(m)) => {
                    let actions = self.hs.on_message(m);
                    self.handle(actions, out);
                }
                Ok(None) => break,
                Err(e) => {
                    let actions = self.hs.on_bad_frame(&e);
                    self.handle(actions, out);
                    break;
                }
            }
        }
    }
}

/// Runs A and B over byte pipes, delivering in chunks of `chunk` bytes.
fn run_bytes(key_b: &[u8], chunk: usize) -> (Vec<Action>, Vec<Action>, usize) {
    let mut pipe_ab = Vec::new();
    let mut pipe_ba = Vec::new();
    let mk = |role, id, key, n| {
        let (hs, out) = Handshake::start(role, id, "prod", secret(key).into(), [n; 32], key_of(n));
        (
            Wire {
                hs,
                dec: FrameDecoder::new(MAX_HANDSHAKE_FRAME),
                events: vec![],
            },
            out,
        )
    };
    let (mut a, out_a) = mk(Role::Initiator, a_id(), KEY, 1);
    let (mut b, out_b) = mk(Role::Acceptor, b_id(), key_b, 2);
    a.handle(out_a, &mut pipe_ab);
    b.handle(out_b, &mut pipe_ba);
    let mut total = 0;
    while !pipe_ab.is_empty() || !pipe_ba.is_empty() {
        let n = chunk.min(pipe_ab.len());
        let bytes: Vec<u8> = pipe_ab.drain(..n).collect();
        total += n;
        b.receive(&bytes, &mut pipe_ba);
        let n = chunk.min(pipe_ba.len());
        let bytes: Vec<u8> = pipe_ba.drain(..n).collect();
        total += n;
        a.receive(&bytes, &mut pipe_ab);
    }
    (a.events, b.events, total)
}

#[test]
fn byte_pipes_split_at_every_byte_establish() {
    let (_, _, total) = run_bytes(KEY, usize::MAX);
    for chunk in 1..=total {
        let (a, b, _) = run_bytes(KEY, chunk);
        assert_eq!(a, vec![Action::Established(b_id())], "chunk {chunk}");
        assert_eq!(b, vec![Action::Established(a_id())], "chunk {chunk}");
    }
}

#[test]
fn byte_pipes_split_at_every_byte_wrong_secret() {
    let (_, _, total) = run_bytes(OTHER_KEY, usize::MAX);
    let bad = vec![Action::Close(LinkEnd::Refused(RefuseReason::BadProof))];
    for chunk in 1..=total {
        let (a, b, _) = run_bytes(OTHER_KEY, chunk);
        assert_eq!(a, bad, "chunk {chunk}");
        assert_eq!(b, bad, "chunk {chunk}");
    }
}

#[test]
fn oversized_handshake_frame_is_a_violation() {
    let (hs, _) = initiator();
    let mut w = Wire {
        hs,
        dec: FrameDecoder::new(MAX_HANDSHAKE_FRAME),
        events: vec![],
    };
    let mut out = Vec::new();
    w.receive(&(MAX_HANDSHAKE_FRAME as u32 + 1).to_be_bytes(), &mut out);
    assert!(matches!(
        w.events.as_slice(),
        [Action::Close(LinkEnd::Refused(
            RefuseReason::ProtocolViolation { .. }
        ))]
    ));
    assert!(!out.is_empty(), "the refusal is sent");
}
