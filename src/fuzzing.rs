//! Entry points for the fuzz targets in `fuzz/` (cargo fuzz, nightly) and
//! for `tests/fuzz_corpus.rs`, which replays their checked-in corpus on
//! stable with every `cargo test`. Each takes arbitrary bytes and must
//! neither panic nor allocate without bound; each checks what must hold
//! whatever the input.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use crate::config::SmtpConfig;
use crate::smtp::session::{Output, Session};
use crate::spool::QueueId;

/// The inbound session: `data` split at its first byte's value into two
/// reads, fed to a session that relays (first bit of the second byte) or
/// not; every reply must be well-formed SMTP.
pub fn session(data: &[u8]) {
    let (cut, relay, input) = match data {
        [c, r, rest @ ..] => (*c as usize, r & 1 == 1, rest),
        _ => return,
    };
    let cfg = Arc::new(SmtpConfig {
        listen: vec![],
        hostname: "mx.example.test".into(),
        backlog: 16,
        max_connections: 10,
        max_message_size: 4096,
        receive_memory: 1 << 30,
        max_recipients: 5,
        max_commands_before_mail: 20,
        idle_timeout: Duration::from_secs(30),
        relay_networks: vec!["10.0.0.0/8".parse().expect("network")],
        accept_domains: vec!["example.test".into()],
        tls: None,
        limits: Default::default(),
        auth: None,
    });
    let ip = match relay {
        true => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        false => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
    };
    let mut s = Session::new(cfg, ip);
    let mut out = Vec::new();
    let cut = cut.min(input.len());
    for chunk in [&input[..cut], &input[cut..]] {
        s.feed(chunk, &mut out);
        while s.is_storing() {
            s.stored(Ok(QueueId(1)), &mut out);
        }
    }
    for o in out {
        if let Output::Reply(r) = o {
            let ok = r.ends_with("\r\n")
                && r.len() >= 6
                && (b'2'..=b'5').contains(&r.as_bytes()[0])
                && r.is_ascii();
            assert!(ok, "malformed reply {r:?}");
        }
    }
}

/// The outbound client: `data` as server replies to a session that asks
/// for TLS if offered; then a transaction if the session got that far.
pub fn replies(data: &[u8]) {
    use crate::delivery::client::{Client, WantTls};
    use crate::delivery::JobRcpt;
    let mut c = Client::with_tls("fuzz.example.test", WantTls::IfOffered);
    let half = data.len() / 2;
    c.receive(&data[..half]);
    if c.is_ready() {
        let rcpt = JobRcpt {
            index: 0,
            address: "u@example.test".into(),
        };
        let started = c.start(
            "s@example.test",
            &[rcpt],
            bytes::Bytes::from_static(b"x\r\n"),
        );
        assert!(started.is_ok());
    }
    c.receive(&data[half..]);
}

/// Cluster frames from a peer, decoded into the link's messages under a
/// 64 KiB limit, as handshake (plain) frames and as sealed frames of an
/// established link: errors are fine, panics and huge allocations are not.
pub fn frames(data: &[u8]) {
    use crate::cluster::identity::Secret;
    use crate::cluster::link::frame::FrameDecoder;
    use crate::cluster::link::handshake::Role;
    use crate::cluster::link::message::LinkMessage;
    use crate::cluster::link::seal;
    let mut d = FrameDecoder::new(64 * 1024);
    d.feed(data);
    while let Ok(Some(_)) = d.next_message::<LinkMessage>() {}
    assert!(d.buffered() <= data.len());

    // As sealed frames: forged ones, then the input sealed by the peer,
    // which opens to the input and parses (or not) as a message.
    let secret = Secret::new(b"fuzzing secret, long enough").expect("secret");
    let mut theirs = seal::keys(&secret, &[1; 32], &[2; 32], Role::Initiator);
    let mut ours = seal::keys(&secret, &[1; 32], &[2; 32], Role::Acceptor);
    let mut d = FrameDecoder::new(64 * 1024);
    d.feed(data);
    while let Ok(Some(_)) = ours.recv.next(&mut d) {}
    assert!(d.buffered() <= data.len());
    let mut ours = seal::keys(&secret, &[1; 32], &[2; 32], Role::Acceptor);
    if let Ok(frame) = theirs.send.seal_payload(data) {
        let mut d = FrameDecoder::new(seal::MAX_SEALED_FRAME);
        d.feed(&frame);
        let parsed = serde_json::from_slice::<LinkMessage>(data).ok();
        assert_eq!(ours.recv.next(&mut d).ok().flatten(), parsed);
    }
}

/// A configuration file: every error names a line within the file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = crate::config::load_str(text, "fuzz.toml") {
        let lines = text.lines().count().max(1);
        for e in &errors.0 {
            assert!(e.line <= lines + 1, "{e} is past the end ({lines} lines)");
        }
    }
}
