use std::collections::VecDeque;

use super::*;
use crate::cluster::link::frame::{encode, FrameDecoder};

pub(super) const KEY: &[u8] = b"correct horse battery staple";
pub(super) const OTHER_KEY: &[u8] = b"incorrect horse battery staple";

pub(super) fn secret(k: &[u8]) -> Secret {
    Secret::new(k).unwrap()
}

fn ident(name: &str, incarnation: u64) -> Identity {
    Identity {
        name: name.into(),
        incarnation,
    }
}

pub(super) fn a_id() -> Identity {
    ident("node-a", 0xaaaa)
}

pub(super) fn b_id() -> Identity {
    ident("node-b", 0xbbbb)
}

/// A machine and the messages it sent on start.
fn machine(role: Role, id: Identity, cluster: &str, key: &[u8], n: u8) -> (Handshake, LinkMessage) {
    let (hs, out) = Handshake::start(role, id, cluster, secret(key).into(), [n; 32], key_of(n));
    let [Action::Send(hello)] = <[Action; 1]>::try_from(out).unwrap() else {
        panic!("start must send exactly one hello")
    };
    (hs, hello)
}

pub(super) fn initiator() -> (Handshake, LinkMessage) {
    machine(Role::Initiator, a_id(), "prod", KEY, 1)
}

fn acceptor() -> (Handshake, LinkMessage) {
    machine(Role::Acceptor, b_id(), "prod", KEY, 2)
}

fn sent(actions: &[Action]) -> Vec<LinkMessage> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn proof_of(actions: &[Action]) -> LinkMessage {
    match sent(actions).as_slice() {
        [m @ LinkMessage::Proof { .. }] => m.clone(),
        other => panic!("expected one proof, got {other:?}"),
    }
}

/// The (pretend) ephemeral key of the side with nonce `[n; 32]`.
pub(super) fn key_of(n: u8) -> PublicKey {
    [n ^ 0x80; 32]
}

fn hello(proto: u16, cluster: &str, id: &Identity, n: u8) -> LinkMessage {
    LinkMessage::Hello {
        proto,
        cluster: cluster.into(),
        name: id.name.clone(),
        incarnation: id.incarnation,
        nonce: [n; 32],
        key: key_of(n),
    }
}

/// Asserts that `actions` refuse with `reason`: send it, then close.
fn assert_refused(actions: &[Action], reason: RefuseReason) {
    assert_eq!(
        actions,
        &[
            Action::Send(LinkMessage::Refuse {
                reason: reason.clone()
            }),
            Action::Close(LinkEnd::Refused(reason)),
        ]
    );
}

fn violation(actions: &[Action]) -> String {
    match actions {
        [Action::Send(LinkMessage::Refuse {
            reason: RefuseReason::ProtocolViolation { detail },
        }), Action::Close(LinkEnd::Refused(RefuseReason::ProtocolViolation { .. }))] => {
            detail.clone()
        }
        other => panic!("expected a protocol violation, got {other:?}"),
    }
}

/// Both machines with their messages in flight, for exploring every order.
#[derive(Clone)]
struct World {
    a: Handshake,
    b: Handshake,
    to_a: VecDeque<LinkMessage>,
    to_b: VecDeque<LinkMessage>,
    /// Non-send actions each side produced, in order.
    a_events: Vec<Action>,
    b_events: Vec<Action>,
}

impl World {
    fn new(a: (Handshake, LinkMessage), b: (Handshake, LinkMessage)) -> World {
        World {
            a: a.0,
            b: b.0,
            to_b: VecDeque::from([a.1]),
            to_a: VecDeque::from([b.1]),
            a_events: vec![],
            b_events: vec![],
        }
    }

    /// Delivers the next message to A (`to_a`) or to B; false if none.
    fn step(&mut self, to_a: bool) -> bool {
        let (queue, hs, out, events) = if to_a {
            (
                &mut self.to_a,
                &mut self.a,
                &mut self.to_b,
                &mut self.a_events,
            )
        } else {
            (
                &mut self.to_b,
                &mut self.b,
                &mut self.to_a,
                &mut self.b_events,
            )
        };
        let Some(msg) = queue.pop_front() else {
            return false;
        };
        for action in hs.on_message(msg) {
            match action {
                Action::Send(m) => out.push_back(m),
                other => events.push(other),
            }
        }
        true
    }
}

/// Every interleaving of deliveries, to completion.
fn explore(w: World, finals: &mut Vec<World>) {
    let mut progressed = false;
    for to_a in [true, false] {
        let mut next = w.clone();
        if next.step(to_a) {
            progressed = true;
            explore(next, finals);
        }
    }
    if !progressed {
        finals.push(w);
    }
}

fn all_orders(a: (Handshake, LinkMessage), b: (Handshake, LinkMessage)) -> Vec<World> {
    let mut finals = vec![];
    explore(World::new(a, b), &mut finals);
    assert!(finals.len() > 1);
    finals
}

#[test]
fn every_message_order_establishes_both_sides() {
    for w in all_orders(initiator(), acceptor()) {
        assert_eq!(w.a_events, vec![Action::Established(b_id())]);
        assert_eq!(w.b_events, vec![Action::Established(a_id())]);
        assert_eq!(w.a.peer(), Some(&b_id()));
        assert_eq!(w.b.peer(), Some(&a_id()));
    }
}

#[test]
fn wrong_secret_is_bad_proof_on_both_sides_in_every_order() {
    let b = machine(Role::Acceptor, b_id(), "prod", OTHER_KEY, 2);
    for w in all_orders(initiator(), b) {
        let bad = Action::Close(LinkEnd::Refused(RefuseReason::BadProof));
        assert_eq!(w.a_events, vec![bad.clone()]);
        assert_eq!(w.b_events, vec![bad]);
        assert!(!w.a.is_established() && !w.b.is_established());
    }
}

#[test]
fn wrong_cluster_is_reported_on_both_sides_in_every_order() {
    let b = machine(Role::Acceptor, b_id(), "staging", KEY, 2);
    for w in all_orders(initiator(), b) {
        assert_eq!(
            w.a_events,
            vec![Action::Close(LinkEnd::Refused(
                RefuseReason::WrongCluster {
                    expected: "prod".into(),
                    got: "staging".into()
                }
            ))]
        );
        assert_eq!(
            w.b_events,
            vec![Action::Close(LinkEnd::Refused(
                RefuseReason::WrongCluster {
                    expected: "staging".into(),
                    got: "prod".into()
                }
            ))]
        );
    }
}

#[test]
fn wrong_proto_is_incompatible_and_the_peer_hears_why() {
    let (mut b, _) = acceptor();
    let out = b.on_message(hello(PROTO_VERSION + 1, "prod", &a_id(), 1));
    let reason = RefuseReason::Incompatible {
        expected: PROTO_VERSION,
        got: PROTO_VERSION + 1,
    };
    assert_refused(&out, reason.clone());
    // The (old or new) peer receives the refusal and can log it.
    let (mut a, _) = initiator();
    let out = a.on_message(sent(&out).remove(0));
    assert_eq!(out, vec![Action::Close(LinkEnd::RefusedByPeer(reason))]);
    // Version is checked before the cluster name.
    let (mut b, _) = acceptor();
    let out = b.on_message(hello(0, "other", &a_id(), 1));
    assert!(matches!(
        out[1],
        Action::Close(LinkEnd::Refused(RefuseReason::Incompatible { got: 0, .. }))
    ));
}

#[test]
fn self_connect_is_refused() {
    // Our own listener: same identity, different nonce.
    let (mut a1, _) = machine(Role::Initiator, a_id(), "prod", KEY, 1);
    let (mut a2, hello2) = machine(Role::Acceptor, a_id(), "prod", KEY, 2);
    assert_refused(&a1.on_message(hello2), RefuseReason::SelfConnect);
    // Our own Hello reflected back.
    let (_, hello1) = machine(Role::Initiator, a_id(), "prod", KEY, 1);
    assert_refused(&a2.on_message(hello1), RefuseReason::SelfConnect);
}

#[test]
fn copied_data_dir_is_refused() {
    let (mut a, _) = initiator();
    let out = a.on_message(hello(
        PROTO_VERSION,
        "prod",
        &ident("node-c", a_id().incarnation),
        9,
    ));
    assert!(violation(&out).contains("incarnation"));
}

#[test]
fn malformed_hello_fields_are_violations() {
    for (id, n) in [
        (ident("", 5), 9),
        (ident(&"x".repeat(256), 5), 9),
        (ident("node-b", 0), 9),
        (b_id(), 1), // echoes the initiator's nonce
    ] {
        let (mut a, _) = initiator();
        violation(&a.on_message(hello(PROTO_VERSION, "prod", &id, n)));
    }
}

#[test]
fn duplicate_hello_is_a_violation() {
    let (mut a, _) = initiator();
    let (_, hb) = acceptor();
    proof_of(&a.on_message(hb.clone()));
    assert_eq!(violation(&a.on_message(hb.clone())), "duplicate hello");
    // Also after establishment.
    let w = all_orders(initiator(), acceptor()).remove(0);
    let mut a = w.a;
    assert_eq!(violation(&a.on_message(hb)), "duplicate hello");
}

#[test]
fn proof_before_hello_is_a_violation() {
    let (mut a, _) = initiator();
    let out = a.on_message(LinkMessage::Proof { mac: [0; 32] });
    assert_eq!(violation(&out), "proof before hello");
}

#[test]
fn duplicate_proof_after_establishment_is_a_violation() {
    let (mut a, ha) = initiator();
    let (mut b, hb) = acceptor();
    let pa = proof_of(&a.on_message(hb));
    let pb = proof_of(&b.on_message(ha));
    assert_eq!(a.on_message(pb.clone()), vec![Action::Established(b_id())]);
    assert_eq!(b.on_message(pa), vec![Action::Established(a_id())]);
    assert_eq!(violation(&a.on_message(pb)), "duplicate proof");
    assert!(!a.is_established());
}

#[test]
fn replayed_proof_from_another_session_is_rejected() {
    // Session 1: a genuine exchange, recorded by an eavesdropper.
    let (mut a1, ha1) = initiator();
    let (mut b1, hb1) = acceptor();
    let pa1 = proof_of(&a1.on_message(hb1));
    proof_of(&b1.on_message(ha1.clone()));
    assert_eq!(
        b1.on_message(pa1.clone()),
        vec![Action::Established(a_id())]
    );
    // Session 2: the attacker replays A's Hello and Proof; B has a new nonce.
    let (mut b2, _) = machine(Role::Acceptor, b_id(), "prod", KEY, 3);
    proof_of(&b2.on_message(ha1));
    assert_refused(&b2.on_message(pa1), RefuseReason::BadProof);
}

#[test]
fn reflected_proof_is_rejected() {
    // The attacker claims to be A, then sends B's own proof back to it.
    let (mut b, _) = acceptor();
    let pb = proof_of(&b.on_message(hello(PROTO_VERSION, "prod", &a_id(), 7)));
    assert_refused(&b.on_message(pb), RefuseReason::BadProof);
}

#[test]
fn a_hello_without_a_key_or_with_ours_is_a_violation() {
    let no_key = r#"{"type":"hello","proto":2,"cluster":"prod","name":"node-a","incarnation":7,
        "nonce":"0101010101010101010101010101010101010101010101010101010101010101"}"#;
    let (mut b, _) = acceptor();
    let out = b.on_message(serde_json::from_str(no_key).unwrap());
    assert_eq!(violation(&out), "missing or echoed key");
    let (mut b, _) = acceptor();
    let LinkMessage::Hello { nonce, .. } = hello(PROTO_VERSION, "prod", &a_id(), 1) else {
        unreachable!()
    };
    let echoed = LinkMessage::Hello {
        proto: PROTO_VERSION,
        cluster: "prod".into(),
        name: "node-a".into(),
        incarnation: 7,
        nonce,
        key: key_of(2),
    };
    assert_eq!(violation(&b.on_message(echoed)), "missing or echoed key");
}

#[test]
fn a_version_1_hello_is_refused_as_incompatible() {
    // Version 1 had no key; its Hello must still parse, so the old peer
    // hears the real reason.
    let v1 = r#"{"type":"hello","proto":1,"cluster":"prod","name":"node-a","incarnation":7,
        "nonce":"0101010101010101010101010101010101010101010101010101010101010101"}"#;
    let msg: LinkMessage = serde_json::from_str(v1).unwrap();
    let (mut b, _) = acceptor();
    assert_refused(
        &b.on_message(msg),
        RefuseReason::Incompatible {
            expected: PROTO_VERSION,
            got: 1,
        },
    );
}

#[test]
fn proof_for_another_role_identity_or_key_is_rejected() {
    let (mut b, _) = acceptor();
    proof_of(&b.on_message(hello(PROTO_VERSION, "prod", &a_id(), 1)));
    let s = secret(KEY);
    let nonces = [[0; 32], [1; 32], [2; 32]];
    let side = |id, n: usize, key| Side {
        id,
        nonce: &nonces[n],
        key,
    };
    let right = |role, ini: Side, acc: Side| LinkMessage::Proof {
        mac: proof_mac(&s, role, &transcript("prod", ini, acc))
            .finalize()
            .into_bytes()
            .into(),
    };
    let (a, b_) = (a_id(), b_id());
    let (ka, kb) = (key_of(1), key_of(2));
    // Sanity: the correctly built proof is accepted.
    assert_eq!(
        b.clone()
            .on_message(right(Role::Initiator, side(&a, 1, &ka), side(&b_, 2, &kb))),
        vec![Action::Established(a_id())]
    );
    let c = ident("node-c", 0xaaaa);
    let mitm = [9; 32];
    for wrong in [
        right(Role::Acceptor, side(&a, 1, &ka), side(&b_, 2, &kb)),
        right(Role::Initiator, side(&b_, 2, &kb), side(&a, 1, &ka)),
        right(Role::Initiator, side(&c, 1, &ka), side(&b_, 2, &kb)),
        // A man in the middle who swapped either key in transit.
        right(Role::Initiator, side(&a, 1, &mitm), side(&b_, 2, &kb)),
        right(Role::Initiator, side(&a, 1, &ka), side(&b_, 2, &mitm)),
    ] {
        assert_refused(&b.clone().on_message(wrong), RefuseReason::BadProof);
    }
}

#[test]
fn both_sides_agree_on_the_session_and_see_each_others_key() {
    let w = all_orders(initiator(), acceptor()).remove(0);
    let (sa, sb) = (w.a.session().unwrap(), w.b.session().unwrap());
    assert_eq!(sa.transcript, sb.transcript);
    assert_eq!((sa.peer_key, sb.peer_key), (key_of(2), key_of(1)));
    // Another connection (another nonce) has another transcript.
    let other = all_orders(initiator(), machine(Role::Acceptor, b_id(), "prod", KEY, 3)).remove(0);
    assert_ne!(other.a.session().unwrap().transcript, sa.transcript);
}

#[test]
fn app_messages_only_after_establishment() {
    let body = serde_json::json!({"append_entries": 1});
    let (mut a, _) = initiator();
    let out = a.on_message(LinkMessage::App { body: body.clone() });
    assert_eq!(violation(&out), "application message before authentication");

    let (mut a, _) = initiator();
    let (_, hb) = acceptor();
    proof_of(&a.on_message(hb));
    let out = a.on_message(LinkMessage::App { body: body.clone() });
    assert_eq!(violation(&out), "application message before authentication");

    let mut a = all_orders(initiator(), acceptor()).remove(0).a;
    assert_eq!(
        a.on_message(LinkMessage::App { body: body.clone() }),
        vec![Action::Deliver(body)]
    );
    assert!(a.is_established());
}

#[test]
fn unknown_message_is_a_violation_in_every_state() {
    let (mut a, _) = initiator();
    assert_eq!(
        violation(&a.on_message(LinkMessage::Unknown)),
        "unknown message type"
    );
    let mut a = all_orders(initiator(), acceptor()).remove(0).a;
    violation(&a.on_message(LinkMessage::Unknown));
}

#[test]
fn bad_frame_is_a_violation() {
    let (mut a, _) = initiator();
    let out = a.on_bad_frame(&FrameError::TooLarge { len: 9999, max: 10 });
    assert!(violation(&out).contains("exceeds"), "{out:?}");
    assert!(a.on_bad_frame(&FrameError::Poisoned).is_empty());
}

#[test]
fn timeout_before_establishment_refuses() {
    let (mut a, _) = initiator();
    assert_refused(&a.on_timeout(), RefuseReason::TimedOut);
    assert_eq!(a.end(), Some(&LinkEnd::Refused(RefuseReason::TimedOut)));

    let (mut a, _) = initiator();
    let (_, hb) = acceptor();
    proof_of(&a.on_message(hb));
    assert_refused(&a.on_timeout(), RefuseReason::TimedOut);
}

#[test]
fn timeout_after_establishment_is_ignored() {
    let mut a = all_orders(initiator(), acceptor()).remove(0).a;
    assert!(a.on_timeout().is_empty());
    assert!(a.is_established());
}

#[test]
fn refuse_ends_the_link_in_every_state() {
    let reason = RefuseReason::violation("x");
    let refuse = LinkMessage::Refuse {
        reason: reason.clone(),
    };
    let expect = vec![Action::Close(LinkEnd::RefusedByPeer(reason))];

    let (mut a, _) = initiator();
    assert_eq!(a.on_message(refuse.clone()), expect);

    let (mut a, _) = initiator();
    proof_of(&a.on_message(acceptor().1));
    assert_eq!(a.on_message(refuse.clone()), expect);

    let mut a = all_orders(initiator(), acceptor()).remove(0).a;
    assert_eq!(a.on_message(refuse.clone()), expect);
    assert!(a.peer().is_none());
    // Closed: everything is ignored, nothing is sent back.
    assert!(a.on_message(refuse).is_empty());
    assert!(a.on_message(acceptor().1).is_empty());
    assert!(a.on_timeout().is_empty());
    assert!(a.on_eof().is_empty());
}

#[test]
fn received_refusal_text_is_bounded() {
    let (mut a, _) = initiator();
    let out = a.on_message(LinkMessage::Refuse {
        reason: RefuseReason::violation("y".repeat(100_000)),
    });
    let [Action::Close(LinkEnd::RefusedByPeer(RefuseReason::ProtocolViolation { detail }))] =
        out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert!(detail.len() < 300);
}

#[test]
fn eof_closes_without_sending() {
    let (mut a, _) = initiator();
    assert_eq!(a.on_eof(), vec![Action::Close(LinkEnd::PeerClosed)]);
    let mut a = all_orders(initiator(), acceptor()).remove(0).a;
    assert_eq!(a.on_eof(), vec![Action::Close(LinkEnd::PeerClosed)]);
}

/// Runs a whole handshake between A (initiator) and B with these
/// keyrings; both sessions if it succeeds, else B's refusal.
fn rotate(a: Keyring, b: Keyring) -> Result<(Session, Session), Vec<Action>> {
    let start = |role, id, k, n| Handshake::start(role, id, "prod", k, [n; 32], key_of(n));
    let (mut a, ha) = start(Role::Initiator, a_id(), a, 1);
    let (mut b, hb) = start(Role::Acceptor, b_id(), b, 2);
    let (ha, hb) = (sent(&ha).remove(0), sent(&hb).remove(0));
    let pa = proof_of(&a.on_message(hb));
    let pb = proof_of(&b.on_message(ha));
    let (out_b, out_a) = (b.on_message(pa), a.on_message(pb));
    if out_b != vec![Action::Established(a_id())] {
        return Err(out_b);
    }
    if out_a != vec![Action::Established(b_id())] {
        return Err(out_a);
    }
    Ok((a.session().unwrap().clone(), b.session().unwrap().clone()))
}

#[test]
fn a_cluster_changes_its_secret_node_by_node() {
    let (old, new) = (secret(KEY), secret(OTHER_KEY));
    let proving = |s: &Secret| Keyring::from(s.clone());
    let both = |p: &Secret, a: &Secret| Keyring {
        proving: p.clone(),
        accepted: vec![a.clone()],
    };
    // Step 1: node by node, each also accepts the new secret; all still
    // prove with the old one. Step 2: each proves with the new one,
    // accepting the old. Step 3: each drops the old one. Between nodes at
    // neighbouring steps, either way round, both ends agree on the secret
    // the initiator proved with, which keys the link.
    for (a, b, keyed_by) in [
        (both(&old, &new), proving(&old), &old),
        (proving(&old), both(&old, &new), &old),
        (both(&new, &old), both(&old, &new), &new),
        (both(&old, &new), both(&new, &old), &old),
        (proving(&new), both(&new, &old), &new),
        (both(&new, &old), proving(&new), &new),
    ] {
        let (sa, sb) = rotate(a, b).expect("established");
        assert_eq!(sa.secret, sb.secret);
        assert_eq!(&sa.secret, keyed_by);
        assert_eq!(sa.transcript, sb.transcript);
    }
    // A node that does not know the secret its peer proves with refuses
    // it: step 2 waits until every node has done step 1.
    for (a, b) in [
        (both(&new, &old), proving(&old)),
        (proving(&old), both(&new, &old)),
        (proving(&new), proving(&old)),
    ] {
        assert_refused(&rotate(a, b).unwrap_err(), RefuseReason::BadProof);
    }
}

#[path = "handshake_wire_tests.rs"]
mod wire;
