//! STARTTLS in the session machine (RFC 3207).

use std::net::IpAddr;
use std::sync::Arc;

use super::tests::{cfg, OUTSIDER, RELAY};
use super::*;
use crate::config::InboundTls;

fn tls_cfg(require_tls: bool) -> Arc<SmtpConfig> {
    let mut c = (*cfg()).clone();
    c.tls = Some(InboundTls {
        cert: "c.pem".into(),
        key: "k.pem".into(),
        require_tls,
        implicit_listen: vec![],
    });
    Arc::new(c)
}

fn feed(s: &mut Session, input: &str) -> Vec<Output> {
    let mut out = Vec::new();
    s.feed(input.as_bytes(), &mut out);
    out
}

fn texts(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Reply(r) => Some(r.trim_end().to_string()),
            _ => None,
        })
        .collect()
}

fn session(require_tls: bool, ip: IpAddr) -> Session {
    Session::new(tls_cfg(require_tls), ip)
}

#[test]
fn starttls_is_offered_only_when_configured_and_not_yet_active() {
    let mut s = session(false, OUTSIDER);
    let ehlo = texts(&feed(&mut s, "EHLO c.test\r\n")).join("\n");
    assert!(ehlo.contains("250-STARTTLS"), "{ehlo}");
    let out = feed(&mut s, "STARTTLS\r\n");
    assert_eq!(texts(&out), ["220 2.0.0 Ready to start TLS"]);
    assert_eq!(out.last(), Some(&Output::StartTls));
    s.tls_started();
    assert!(s.is_tls());
    // The session starts over: HELO forgotten, STARTTLS no longer offered.
    assert_eq!(
        texts(&feed(&mut s, "MAIL FROM:<a@b.test>\r\n")),
        ["503 5.5.1 Error: send HELO/EHLO first"]
    );
    let ehlo = texts(&feed(&mut s, "EHLO c.test\r\n")).join("\n");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(
        texts(&feed(&mut s, "STARTTLS\r\n")),
        ["503 5.5.1 Error: TLS already active"]
    );

    let mut plain = Session::new(cfg(), OUTSIDER);
    let ehlo = texts(&feed(&mut plain, "EHLO c.test\r\n")).join("\n");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(
        texts(&feed(&mut plain, "STARTTLS\r\n")),
        ["502 5.5.1 Command not implemented"]
    );
    let mut unloaded = session(false, OUTSIDER);
    unloaded.without_tls();
    assert!(!texts(&feed(&mut unloaded, "EHLO c.test\r\n"))
        .join("")
        .contains("STARTTLS"));
}

#[test]
fn starttls_wants_ehlo_first_and_no_arguments() {
    let mut s = session(false, OUTSIDER);
    assert_eq!(
        texts(&feed(&mut s, "STARTTLS\r\n")),
        ["503 5.5.1 Error: send EHLO first"]
    );
    feed(&mut s, "EHLO c.test\r\n");
    assert_eq!(
        texts(&feed(&mut s, "STARTTLS now\r\n")),
        ["501 5.5.4 Syntax: STARTTLS"]
    );
    assert_eq!(feed(&mut s, "starttls\r\n").last(), Some(&Output::StartTls));
}

/// CVE-2011-0411: commands pipelined behind STARTTLS in plaintext must
/// never run as if they had come over TLS.
#[test]
fn plaintext_pipelined_after_starttls_is_discarded_and_the_client_refused() {
    let mut s = session(false, RELAY);
    feed(&mut s, "EHLO c.test\r\n");
    let out = feed(
        &mut s,
        "STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@far.test>\r\n",
    );
    assert_eq!(
        texts(&out),
        ["554 5.5.1 mx.example.test Error: command pipelining after STARTTLS"]
    );
    assert_eq!(out.last(), Some(&Output::Close));
    assert!(s.is_closed());

    // Bytes arriving after the 220 (a later packet) are never read as
    // commands either: the handshake owns the stream, and a session that
    // starts TLS forgets them.
    let mut s = session(false, RELAY);
    feed(&mut s, "EHLO c.test\r\n");
    assert_eq!(feed(&mut s, "STARTTLS\r\n").last(), Some(&Output::StartTls));
    assert!(feed(&mut s, "MAIL FROM:<evil@x.test>\r\n").is_empty());
    s.tls_started();
    let out = feed(&mut s, "RCPT TO:<v@far.test>\r\n");
    assert_eq!(texts(&out), ["503 5.5.1 Error: need MAIL command"]);
}

#[test]
fn require_tls_holds_relaying_clients_to_starttls() {
    let mut s = session(true, RELAY);
    feed(&mut s, "EHLO c.test\r\n");
    assert_eq!(
        texts(&feed(&mut s, "MAIL FROM:<a@b.test>\r\n")),
        ["530 5.7.0 Must issue a STARTTLS command first"]
    );
    feed(&mut s, "STARTTLS\r\n");
    s.tls_started();
    feed(&mut s, "EHLO c.test\r\n");
    assert_eq!(
        texts(&feed(&mut s, "MAIL FROM:<a@b.test>\r\n")),
        ["250 2.1.0 Ok"]
    );
    // Outsiders sending to accepted domains are not held to it.
    let mut o = session(true, OUTSIDER);
    feed(&mut o, "EHLO c.test\r\n");
    assert_eq!(
        texts(&feed(&mut o, "MAIL FROM:<a@b.test>\r\n")),
        ["250 2.1.0 Ok"]
    );
}

#[test]
fn require_tls_without_a_certificate_is_a_temporary_failure() {
    let mut s = session(true, RELAY);
    s.without_tls();
    feed(&mut s, "EHLO c.test\r\n");
    assert_eq!(
        texts(&feed(&mut s, "MAIL FROM:<a@b.test>\r\n")),
        ["454 4.7.0 TLS not available due to temporary reason"]
    );
}

fn auth_session(ip: IpAddr) -> Session {
    let mut c = (*tls_cfg(false)).clone();
    c.auth = Some("passwd".into());
    let mut s = Session::new(Arc::new(c), ip);
    feed(&mut s, "EHLO c.test\r\n");
    s
}

fn verify_of(out: &[Output]) -> Option<(String, String)> {
    out.iter().find_map(|o| match o {
        Output::Verify { user, password } => Some((user.clone(), password.clone())),
        _ => None,
    })
}

#[test]
fn auth_is_offered_and_accepted_only_over_tls() {
    let mut s = auth_session(OUTSIDER);
    assert_eq!(
        texts(&feed(&mut s, "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")),
        ["538 5.7.11 Encryption required for requested authentication mechanism"]
    );
    feed(&mut s, "STARTTLS\r\n");
    s.tls_started();
    let ehlo = texts(&feed(&mut s, "EHLO c.test\r\n")).join("\n");
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN"), "{ehlo}");
    // Before: an outsider may not relay.
    feed(&mut s, "MAIL FROM:<a@b.test>\r\n");
    assert_eq!(
        texts(&feed(&mut s, "RCPT TO:<u@far.test>\r\n")),
        ["554 5.7.1 Relay access denied"]
    );
    feed(&mut s, "RSET\r\n");
    // "\0alice\0secret"
    let out = feed(
        &mut s,
        "AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@b.test>\r\n",
    );
    assert_eq!(verify_of(&out), Some(("alice".into(), "secret".into())));
    assert!(s.is_verifying());
    let mut out = Vec::new();
    s.verified("alice", Verdict::Valid, &mut out);
    assert_eq!(
        texts(&out),
        ["235 2.7.0 Authentication successful", "250 2.1.0 Ok"]
    );
    assert_eq!(s.user(), Some("alice"));
    assert_eq!(
        texts(&feed(&mut s, "RCPT TO:<u@far.test>\r\n")),
        ["250 2.1.5 Ok"],
        "may relay now"
    );
}

#[test]
fn auth_login_and_plain_challenges_failures_and_cancel() {
    let mut s = auth_session(OUTSIDER);
    feed(&mut s, "STARTTLS\r\n");
    s.tls_started();
    feed(&mut s, "EHLO c.test\r\n");
    assert_eq!(texts(&feed(&mut s, "AUTH LOGIN\r\n")), ["334 VXNlcm5hbWU6"]);
    assert_eq!(texts(&feed(&mut s, "Ym9i\r\n")), ["334 UGFzc3dvcmQ6"]);
    let out = feed(&mut s, "d3Jvbmc=\r\n");
    assert_eq!(verify_of(&out), Some(("bob".into(), "wrong".into())));
    let mut out = Vec::new();
    s.verified("bob", Verdict::Invalid, &mut out);
    assert_eq!(
        texts(&out),
        ["535 5.7.8 Authentication credentials invalid"]
    );
    assert_eq!(texts(&feed(&mut s, "AUTH PLAIN\r\n")), ["334"]);
    assert_eq!(
        texts(&feed(&mut s, "*\r\n")),
        ["501 5.0.0 Authentication cancelled"]
    );
    assert_eq!(
        texts(&feed(&mut s, "AUTH PLAIN !!!\r\n")),
        ["501 5.5.2 Cannot decode response"]
    );
    assert_eq!(
        texts(&feed(&mut s, "AUTH CRAM-MD5\r\n")),
        ["504 5.5.4 Unrecognized authentication type"]
    );
    // Acting as someone else (authzid) is refused: "root\0alice\0secret".
    assert_eq!(
        texts(&feed(&mut s, "AUTH PLAIN cm9vdABhbGljZQBzZWNyZXQ=\r\n")),
        ["501 5.5.2 Cannot decode response"]
    );
    let mut plain = Session::new(tls_cfg(false), OUTSIDER);
    feed(&mut plain, "EHLO c.test\r\n");
    assert_eq!(
        texts(&feed(&mut plain, "AUTH PLAIN x\r\n")),
        ["502 5.5.1 Command not implemented"]
    );
}

#[test]
fn auth_responses_may_be_longer_than_command_lines_but_not_without_bound() {
    use base64ct::{Base64, Encoding};
    let mut s = auth_session(OUTSIDER);
    feed(&mut s, "STARTTLS\r\n");
    s.tls_started();
    feed(&mut s, "EHLO c.test\r\n");
    // A 3000-byte password (a generated one, or a token): past 512 bytes,
    // so it comes after the 334 (RFC 4954 section 4), for PLAIN and LOGIN.
    let password = "p".repeat(3000);
    let plain = Base64::encode_string(format!("\0alice\0{password}").as_bytes());
    assert_eq!(texts(&feed(&mut s, "AUTH PLAIN\r\n")), ["334"]);
    let out = feed(&mut s, &format!("{plain}\r\n"));
    assert_eq!(verify_of(&out), Some(("alice".into(), password.clone())));
    let mut out = Vec::new();
    s.verified("alice", Verdict::Invalid, &mut out);
    feed(&mut s, "AUTH LOGIN\r\n");
    feed(&mut s, "YWxpY2U=\r\n");
    let line = format!("{}\r\n", Base64::encode_string(password.as_bytes()));
    assert_eq!(
        verify_of(&feed(&mut s, &line)),
        Some(("alice".into(), password))
    );
    s.verified("alice", Verdict::Invalid, &mut out);
    // The AUTH command itself keeps the 512-byte limit.
    let inline = format!("AUTH PLAIN {plain}\r\n");
    assert_eq!(texts(&feed(&mut s, &inline)), ["500 5.5.2 Line too long"]);
    // A response past 12,288 octets is refused, and the session goes on.
    feed(&mut s, "AUTH PLAIN\r\n");
    let huge = format!("{}\r\n", "A".repeat(MAX_AUTH_LINE));
    assert_eq!(
        texts(&feed(&mut s, &huge)),
        ["500 5.5.6 Authentication Exchange line is too long"]
    );
    assert_eq!(texts(&feed(&mut s, "NOOP\r\n")), ["250 2.0.0 Ok"]);
}
