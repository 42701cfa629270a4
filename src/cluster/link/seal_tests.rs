use proptest::prelude::*;
use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use serde_json::json;

use super::*;

fn secret(s: &[u8]) -> Secret {
    Secret::new(s).unwrap()
}

const SECRET: &[u8] = b"correct horse battery staple";

/// Both ends' keys after a real X25519 exchange under `secrets`.
fn pair_with(secrets: (&[u8], &[u8]), transcript: [u8; 32]) -> (Keys, Keys) {
    let rng = ring::rand::SystemRandom::new();
    let a = EphemeralPrivateKey::generate(&X25519, &rng).unwrap();
    let b = EphemeralPrivateKey::generate(&X25519, &rng).unwrap();
    let (pa, pb) = (
        a.compute_public_key().unwrap(),
        b.compute_public_key().unwrap(),
    );
    let (sa, sb) = (secret(secrets.0), secret(secrets.1));
    let ka = agree_ephemeral(a, &UnparsedPublicKey::new(&X25519, pb), |s| {
        keys(&sa, s, &transcript, Role::Initiator)
    })
    .unwrap();
    let kb = agree_ephemeral(b, &UnparsedPublicKey::new(&X25519, pa), |s| {
        keys(&sb, s, &transcript, Role::Acceptor)
    })
    .unwrap();
    (ka, kb)
}

fn pair() -> (Keys, Keys) {
    pair_with((SECRET, SECRET), [7; 32])
}

/// Both ends' keys from a fixed shared secret, each with its own view of
/// the transcript: the same keys every call.
fn fixed(transcripts: ([u8; 32], [u8; 32])) -> (Keys, Keys) {
    let s = secret(SECRET);
    (
        keys(&s, &[5; 32], &transcripts.0, Role::Initiator),
        keys(&s, &[5; 32], &transcripts.1, Role::Acceptor),
    )
}

fn open_raw(o: &mut Opener, payload: &[u8]) -> Result<BytesMut, FrameError> {
    o.open(BytesMut::from(payload))
}

fn app(n: u64) -> LinkMessage {
    LinkMessage::App {
        body: json!({"entry": n, "text": "raft entry carrying a queue id"}),
    }
}

/// The payload of a sealed frame, as the decoder hands it over.
fn payload(frame: &Bytes) -> &[u8] {
    &frame[HEADER_LEN..]
}

fn open_msg(o: &mut Opener, frame: &Bytes) -> Result<LinkMessage, FrameError> {
    let mut dec = FrameDecoder::new(MAX_SEALED_FRAME);
    dec.feed(frame);
    o.next(&mut dec).map(|m| m.expect("one whole frame"))
}

#[test]
fn each_direction_opens_what_the_other_end_sealed_in_order() {
    let (mut a, mut b) = pair();
    let mut dec = FrameDecoder::new(MAX_SEALED_FRAME);
    for n in 0..5 {
        dec.feed(&a.send.seal(&app(n)).unwrap());
    }
    for n in 0..5 {
        assert_eq!(b.recv.next(&mut dec).unwrap(), Some(app(n)));
    }
    assert_eq!(b.recv.next(&mut dec).unwrap(), None);
    let back = b.send.seal(&app(99)).unwrap();
    assert_eq!(open_msg(&mut a.recv, &back).unwrap(), app(99));
}

#[test]
fn nothing_of_the_message_is_readable_on_the_wire() {
    let (mut a, _) = pair();
    let frame = a.send.seal(&app(1)).unwrap();
    let wire = String::from_utf8_lossy(&frame);
    for word in ["raft entry", "queue id", "entry", "app"] {
        assert!(!wire.contains(word), "{word:?} readable in {wire:?}");
    }
    // The same message sealed again looks different.
    assert_ne!(a.send.seal(&app(1)).unwrap(), frame);
}

#[test]
fn an_altered_byte_anywhere_fails_to_open() {
    let t = ([7; 32], [7; 32]);
    let frame = fixed(t).0.send.seal(&app(1)).unwrap();
    for i in 0..payload(&frame).len() {
        let mut bad = payload(&frame).to_vec();
        bad[i] ^= 0x01;
        let mut recv = fixed(t).1.recv;
        assert_eq!(
            open_raw(&mut recv, &bad),
            Err(FrameError::Forged),
            "byte {i}"
        );
    }
    // A shortened frame (a lying length header) fails too.
    let short = &payload(&frame)[..payload(&frame).len() - 1];
    assert_eq!(
        open_raw(&mut fixed(t).1.recv, short),
        Err(FrameError::Forged)
    );
    // The genuine frame opens.
    assert_eq!(open_msg(&mut fixed(t).1.recv, &frame).unwrap(), app(1));
}

#[test]
fn a_failure_ends_the_stream() {
    let (mut a, mut b) = pair();
    let good = a.send.seal(&app(0)).unwrap();
    let mut dec = FrameDecoder::new(MAX_SEALED_FRAME);
    dec.feed(&a.send.seal(&app(1)).unwrap());
    dec.feed(&good);
    // Frame 1 arrives where frame 0 was due: forged, and nothing after it
    // is opened, not even the genuine frame 0.
    assert_eq!(b.recv.next(&mut dec), Err(FrameError::Forged));
    assert_eq!(b.recv.next(&mut dec), Err(FrameError::Poisoned));
    assert_eq!(
        open_raw(&mut b.recv, payload(&good)),
        Err(FrameError::Poisoned)
    );
}

#[test]
fn a_repeated_reordered_or_dropped_frame_fails_to_open() {
    let (mut a, b) = pair();
    let f: Vec<Bytes> = (0..3).map(|n| a.send.seal(&app(n)).unwrap()).collect();
    let mut recv = b.recv;
    assert!(open_msg(&mut recv, &f[0]).is_ok());
    // Repeated.
    assert_eq!(open_raw(&mut recv, payload(&f[0])), Err(FrameError::Forged));
    // Skipping one (dropped, or the next two swapped).
    let (mut a, mut b) = fixed(([7; 32], [7; 32]));
    let f: Vec<Bytes> = (0..3).map(|n| a.send.seal(&app(n)).unwrap()).collect();
    assert!(open_msg(&mut b.recv, &f[0]).is_ok());
    assert_eq!(
        open_raw(&mut b.recv, payload(&f[2])),
        Err(FrameError::Forged)
    );
}

#[test]
fn frames_of_another_connection_transcript_secret_or_direction_fail_to_open() {
    let (mut a, mut b) = pair();
    let frame = a.send.seal(&app(0)).unwrap();
    // Reflected back to its sender.
    assert_eq!(
        open_raw(&mut a.recv, payload(&frame)),
        Err(FrameError::Forged)
    );
    // Another connection with the same secret and transcript: its own
    // X25519 exchange gives it other keys.
    let (_, mut other) = pair();
    assert_eq!(
        open_raw(&mut other.recv, payload(&frame)),
        Err(FrameError::Forged)
    );
    // The same shared secret, but the two ends saw different transcripts.
    let (mut a2, mut b2) = fixed(([7; 32], [8; 32]));
    let f2 = a2.send.seal(&app(0)).unwrap();
    assert_eq!(
        open_raw(&mut b2.recv, payload(&f2)),
        Err(FrameError::Forged)
    );
    // A wrong secret.
    let (mut a3, mut b3) = pair_with((SECRET, b"another secret entirely"), [7; 32]);
    let f3 = a3.send.seal(&app(0)).unwrap();
    assert_eq!(
        open_raw(&mut b3.recv, payload(&f3)),
        Err(FrameError::Forged)
    );
    // The genuine peer opens it.
    assert_eq!(open_msg(&mut b.recv, &frame).unwrap(), app(0));
}

#[test]
fn an_oversized_message_is_refused_before_it_counts() {
    let (mut a, mut b) = pair();
    let big = vec![b'x'; MAX_FRAME + 1];
    assert!(matches!(
        a.send.seal_payload(&big),
        Err(FrameError::TooLarge { .. })
    ));
    let next = a.send.seal(&app(0)).unwrap();
    assert_eq!(open_msg(&mut b.recv, &next).unwrap(), app(0));
}

#[test]
fn a_sealed_frame_that_is_not_a_message_is_malformed() {
    let (mut a, mut b) = pair();
    let frame = a.send.seal_payload(b"not json").unwrap();
    assert!(matches!(
        open_msg(&mut b.recv, &frame),
        Err(FrameError::Malformed(_))
    ));
}

proptest! {
    #[test]
    fn arbitrary_frames_never_open_or_panic(frame in proptest::collection::vec(any::<u8>(), 0..256)) {
        let (_, mut b) = fixed(([7; 32], [7; 32]));
        prop_assert_eq!(open_raw(&mut b.recv, &frame), Err(FrameError::Forged));
    }
}

#[test]
fn a_refusal_in_the_clear_is_taken_only_as_the_first_frame() {
    // A peer that could not verify our proof refuses before it has keys.
    let refusal = LinkMessage::Refuse {
        reason: crate::cluster::link::message::RefuseReason::BadProof,
    };
    let plain = crate::cluster::link::frame::encode(&refusal).unwrap();
    let (_, mut b) = pair();
    let mut dec = FrameDecoder::new(MAX_SEALED_FRAME);
    dec.feed(&plain);
    assert_eq!(b.recv.next(&mut dec), Ok(Some(refusal.clone())));
    // After a sealed frame, the same bytes are a forgery.
    let (mut a, mut b) = pair();
    let mut dec = FrameDecoder::new(MAX_SEALED_FRAME);
    dec.feed(&a.send.seal(&app(0)).unwrap());
    dec.feed(&plain);
    assert_eq!(b.recv.next(&mut dec), Ok(Some(app(0))));
    assert_eq!(b.recv.next(&mut dec), Err(FrameError::Forged));
    // Nor is any other plaintext message taken.
    let (_, mut b) = pair();
    let mut dec = FrameDecoder::new(MAX_SEALED_FRAME);
    dec.feed(&crate::cluster::link::frame::encode(&app(0)).unwrap());
    assert_eq!(b.recv.next(&mut dec), Err(FrameError::Forged));
}
