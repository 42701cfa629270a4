use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::Bytes;

use super::*;

pub(super) const RELAY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
pub(super) const OUTSIDER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));

pub(super) fn cfg() -> Arc<SmtpConfig> {
    Arc::new(SmtpConfig {
        listen: vec![],
        hostname: "mx.example.test".into(),
        backlog: 16,
        max_connections: 10,
        max_message_size: 1000,
        receive_memory: 1 << 30,
        max_recipients: 3,
        max_commands_before_mail: 20,
        idle_timeout: Duration::from_secs(30),
        relay_networks: vec!["10.0.0.0/8".parse().unwrap()],
        accept_domains: vec!["example.test".into(), "[192.0.2.1]".into()],
        tls: None,
        limits: Default::default(),
        auth: None,
    })
}

/// Feed `chunks` one by one, answering every Deliver with a queue id the
/// way the driver does, and return all outputs in order.
pub(super) fn run_with(cfg: Arc<SmtpConfig>, ip: IpAddr, chunks: &[&[u8]]) -> Vec<Output> {
    let mut s = Session::new(cfg, ip);
    let mut out = Vec::new();
    let mut next_id = 1;
    for chunk in chunks {
        s.feed(chunk, &mut out);
        while s.is_storing() {
            s.stored(Ok(QueueId(next_id)), &mut out);
            next_id += 1;
        }
    }
    out
}

fn run(ip: IpAddr, input: &str) -> Vec<Output> {
    run_with(cfg(), ip, &[input.as_bytes()])
}

/// Reply texts only, CRLF stripped.
fn replies(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Reply(r) => Some(r.trim_end().to_owned()),
            _ => None,
        })
        .collect()
}

fn delivered(out: &[Output]) -> Vec<&Incoming> {
    out.iter()
        .filter_map(|o| match o {
            Output::Deliver(m) => Some(m),
            _ => None,
        })
        .collect()
}

/// The last reply, for one-rule tests.
fn last(ip: IpAddr, input: &str) -> String {
    replies(&run(ip, input)).pop().unwrap()
}

const TX: &str = "EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n";

const DIALOG: &[u8] = b"EHLO client.test\r\n\
    MAIL FROM:<sender@outside.test> BODY=8BITMIME SIZE=100\r\n\
    RCPT TO:<u1@example.test>\r\n\
    RCPT TO:<nobody@elsewhere.test>\r\n\
    RCPT TO:<U2@Example.Test.>\r\n\
    DATA\r\n\
    Subject: hi\r\n\r\n..dot\r\nline\r\n.\r\n\
    NOOP\n\
    MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n.\r\n\
    BOGUS\r\n\
    QUIT\r\n";

#[test]
fn full_dialog() {
    let out = run_with(cfg(), OUTSIDER, &[DIALOG]);
    let r = replies(&out);
    assert!(r[0].starts_with("250-mx.example.test\r\n"));
    assert_eq!(
        &r[1..],
        [
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "554 5.7.1 Relay access denied",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued as 0000000000000001",
            "250 2.0.0 Ok",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued as 0000000000000002",
            "500 5.5.1 Command unrecognized",
            "221 2.0.0 mx.example.test Bye",
        ]
    );
    assert_eq!(out.last(), Some(&Output::Close));
    let m = delivered(&out);
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].sender, "sender@outside.test");
    assert_eq!(m[0].recipients, ["u1@example.test", "U2@example.test"]);
    assert_eq!(
        m[0].body,
        Bytes::from_static(b"Subject: hi\r\n\r\n.dot\r\nline\r\n")
    );
    assert_eq!(m[0].helo, "client.test");
    assert_eq!(m[0].client_ip, OUTSIDER);
    assert_eq!(m[1].sender, "");
    assert_eq!(m[1].recipients, ["postmaster@mx.example.test"]);
    assert!(m[1].body.is_empty());
}

#[test]
fn byte_by_byte_matches_one_piece() {
    let whole = run_with(cfg(), OUTSIDER, &[DIALOG]);
    let bytes: Vec<&[u8]> = DIALOG.chunks(1).collect();
    assert_eq!(run_with(cfg(), OUTSIDER, &bytes), whole);
}

#[test]
fn every_two_piece_split_matches_one_piece() {
    let whole = run_with(cfg(), OUTSIDER, &[DIALOG]);
    for i in 0..=DIALOG.len() {
        let (a, b) = DIALOG.split_at(i);
        assert_eq!(run_with(cfg(), OUTSIDER, &[a, b]), whole, "split at {i}");
    }
}

#[test]
fn three_piece_splits_match_one_piece() {
    let whole = run_with(cfg(), OUTSIDER, &[DIALOG]);
    for i in (0..=DIALOG.len()).step_by(7) {
        for j in (i..=DIALOG.len()).step_by(5) {
            let chunks = [&DIALOG[..i], &DIALOG[i..j], &DIALOG[j..]];
            assert_eq!(run_with(cfg(), OUTSIDER, &chunks), whole, "{i}/{j}");
        }
    }
}

#[test]
fn greeting_names_host() {
    assert_eq!(
        Session::new(cfg(), RELAY).greeting(),
        "220 mx.example.test ESMTP mtad\r\n"
    );
}

#[test]
fn ehlo_advertises_exactly_our_extensions() {
    let out = run(OUTSIDER, "EHLO c.test\r\n");
    assert_eq!(
        out,
        [Output::Reply(
            "250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n\
             250 ENHANCEDSTATUSCODES\r\n"
                .into()
        )]
    );
}

#[test]
fn helo_is_accepted() {
    assert_eq!(last(OUTSIDER, "HELO c.test\r\n"), "250 mx.example.test");
    assert_eq!(
        last(OUTSIDER, "HELO c.test\r\nMAIL FROM:<a@b.test>\r\n"),
        "250 2.1.0 Ok"
    );
}

#[test]
fn ehlo_without_domain_is_a_syntax_error() {
    assert!(last(OUTSIDER, "EHLO\r\n").starts_with("501 5.5.4"));
}

#[test]
fn ehlo_resets_transaction() {
    let r = last(
        OUTSIDER,
        &format!("{TX}EHLO again.test\r\nRCPT TO:<u@example.test>\r\n"),
    );
    assert_eq!(r, "503 5.5.1 Error: need MAIL command");
}

#[test]
fn mail_before_ehlo_is_out_of_order() {
    assert_eq!(
        last(OUTSIDER, "MAIL FROM:<a@b.test>\r\n"),
        "503 5.5.1 Error: send HELO/EHLO first"
    );
}

#[test]
fn rcpt_before_mail_is_out_of_order() {
    assert_eq!(
        last(OUTSIDER, "EHLO c.test\r\nRCPT TO:<u@example.test>\r\n"),
        "503 5.5.1 Error: need MAIL command"
    );
}

#[test]
fn data_before_rcpt_is_out_of_order() {
    assert_eq!(
        last(OUTSIDER, &format!("{TX}DATA\r\n")),
        "503 5.5.1 Error: need RCPT command"
    );
    assert_eq!(
        last(OUTSIDER, "EHLO c.test\r\nDATA\r\n"),
        "503 5.5.1 Error: need MAIL command"
    );
}

#[test]
fn nested_mail_is_out_of_order() {
    assert_eq!(
        last(OUTSIDER, &format!("{TX}MAIL FROM:<x@y.test>\r\n")),
        "503 5.5.1 Error: nested MAIL command"
    );
}

#[test]
fn data_without_accepted_recipient() {
    let r = last(OUTSIDER, &format!("{TX}RCPT TO:<u@other.test>\r\nDATA\r\n"));
    assert_eq!(r, "554 5.5.1 Error: no valid recipients");
}

#[test]
fn null_sender_and_8bitmime_are_accepted() {
    assert_eq!(
        last(OUTSIDER, "EHLO c\r\nMAIL FROM:<> BODY=8BITMIME\r\n"),
        "250 2.1.0 Ok"
    );
    assert_eq!(
        last(OUTSIDER, "EHLO c\r\nMAIL FROM:<a@b.test> BODY=7BIT\r\n"),
        "250 2.1.0 Ok"
    );
}

#[test]
fn declared_size_above_maximum() {
    let r = last(OUTSIDER, "EHLO c\r\nMAIL FROM:<a@b.test> SIZE=1001\r\n");
    assert_eq!(r, "552 5.3.4 Message size exceeds fixed maximum");
    assert_eq!(
        last(OUTSIDER, "EHLO c\r\nMAIL FROM:<a@b.test> SIZE=1000\r\n"),
        "250 2.1.0 Ok"
    );
}

#[test]
fn parameters_not_offered_are_refused() {
    for line in [
        "MAIL FROM:<a@b.test> SMTPUTF8",
        "MAIL FROM:<a@b.test> BODY=BINARYMIME",
        "MAIL FROM:<a@b.test> RET=FULL",
        "MAIL FROM:<a@b.test> XFOO=1",
    ] {
        let r = last(OUTSIDER, &format!("EHLO c\r\n{line}\r\n"));
        assert!(r.starts_with("555 5.5.4"), "{line}: {r}");
    }
    let r = last(
        OUTSIDER,
        &format!("{TX}RCPT TO:<u@example.test> NOTIFY=NEVER\r\n"),
    );
    assert!(r.starts_with("555 5.5.4"), "{r}");
}

#[test]
fn bad_sender_address() {
    for from in ["<a..b@c>", "<a@>", "<postmaster>", "<a b@c>"] {
        let r = last(OUTSIDER, &format!("EHLO c\r\nMAIL FROM:{from}\r\n"));
        assert_eq!(r, "501 5.1.7 Bad sender address syntax", "{from}");
    }
}

#[test]
fn bad_recipient_address() {
    for to in ["<a..b@example.test>", "<>", "<a@example..test>"] {
        let r = last(OUTSIDER, &format!("{TX}RCPT TO:{to}\r\n"));
        assert_eq!(r, "501 5.1.3 Bad recipient address syntax", "{to}");
    }
}

#[test]
fn recipient_without_domain() {
    let r = last(RELAY, &format!("{TX}RCPT TO:<user>\r\n"));
    assert_eq!(r, "501 5.1.3 Recipient address must contain a domain");
}

#[test]
fn bad_syntax() {
    for line in ["MAIL FROM:a@b.test", "MAIL a@b.test", "MAIL FROM:<a@b.test"] {
        let r = last(OUTSIDER, &format!("EHLO c\r\n{line}\r\n"));
        assert!(r.starts_with("501 5.5.4"), "{line}: {r}");
    }
}

#[test]
fn unknown_command() {
    assert_eq!(
        last(OUTSIDER, "FOO bar\r\n"),
        "500 5.5.1 Command unrecognized"
    );
    assert_eq!(last(OUTSIDER, "\r\n"), "500 5.5.1 Command unrecognized");
}

#[test]
fn commands_not_offered() {
    for cmd in [
        "EXPN list",
        "BDAT 10 LAST",
        "AUTH PLAIN",
        "STARTTLS",
        "ETRN x",
        "bdat",
    ] {
        assert_eq!(
            last(OUTSIDER, &format!("{cmd}\r\n")),
            "502 5.5.1 Command not implemented"
        );
    }
}

#[test]
fn vrfy_help_noop_rset() {
    assert!(last(OUTSIDER, "VRFY someone\r\n").starts_with("252 2.5.0 "));
    assert!(last(OUTSIDER, "HELP\r\n").starts_with("214 2.0.0 "));
    assert_eq!(last(OUTSIDER, "NOOP\r\n"), "250 2.0.0 Ok");
    let r = replies(&run(
        OUTSIDER,
        &format!("{TX}RSET\r\nRCPT TO:<u@example.test>\r\n"),
    ));
    assert_eq!(
        r[2..],
        ["250 2.0.0 Ok", "503 5.5.1 Error: need MAIL command"]
    );
}

#[test]
fn quit_closes_and_later_input_is_ignored() {
    let out = run(OUTSIDER, "QUIT\r\nNOOP\r\n");
    assert_eq!(
        out,
        [
            Output::Reply("221 2.0.0 mx.example.test Bye\r\n".into()),
            Output::Close
        ]
    );
}

#[test]
fn overlong_line_is_refused_and_session_goes_on() {
    let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(600));
    let r = replies(&run(OUTSIDER, &long));
    assert_eq!(r, ["500 5.5.2 Line too long", "250 2.0.0 Ok"]);
    // 512 octets including CRLF is the limit, not beyond.
    let exact = format!("NOOP {}\r\n", "x".repeat(512 - 7));
    assert_eq!(exact.len(), 512);
    assert_eq!(last(OUTSIDER, &exact), "250 2.0.0 Ok");
    let over = format!("NOOP {}\r\n", "x".repeat(512 - 6));
    assert_eq!(last(OUTSIDER, &over), "500 5.5.2 Line too long");
}

#[test]
fn bare_lf_commands_are_accepted() {
    let r = replies(&run(
        OUTSIDER,
        "EHLO c\nMAIL FROM:<a@b.test>\nRCPT TO:<u@example.test>\n",
    ));
    assert_eq!(r[1..], ["250 2.1.0 Ok", "250 2.1.5 Ok"]);
}

#[test]
fn outsider_cannot_relay() {
    let r = last(OUTSIDER, &format!("{TX}RCPT TO:<u@elsewhere.test>\r\n"));
    assert_eq!(r, "554 5.7.1 Relay access denied");
}

#[test]
fn outsider_may_send_to_accepted_domains() {
    for to in [
        "u@example.test",
        "u@EXAMPLE.test.",
        "u@[192.0.2.1]",
        "\"a b\"@example.test",
    ] {
        assert_eq!(
            last(OUTSIDER, &format!("{TX}RCPT TO:<{to}>\r\n")),
            "250 2.1.5 Ok",
            "{to}"
        );
    }
}

#[test]
fn relay_network_may_relay_anywhere() {
    let out = run(
        RELAY,
        &format!(
            "{TX}RCPT TO:<u@elsewhere.test>\r\nRCPT TO:<@hop.test:v@far.test>\r\nDATA\r\n.\r\n"
        ),
    );
    assert_eq!(
        delivered(&out)[0].recipients,
        ["u@elsewhere.test", "v@far.test"]
    );
}

#[test]
fn ipv4_mapped_client_is_matched_as_ipv4() {
    let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
    assert_eq!(
        last(mapped, &format!("{TX}RCPT TO:<u@far.test>\r\n")),
        "250 2.1.5 Ok"
    );
}

#[test]
fn relay_tricks_are_refused_from_outsiders() {
    for to in [
        "u%far.test@example.test",
        "far.test!u@example.test",
        "\"u@far.test\"@example.test",
        "@example.test:u@example.test",
        "@hop.test,@example.test:u@far.test",
        "u@[192.0.2.77]",
        "u@[IPv6:2001:db8::1]",
        "U@FAR.TEST",
        "u@far.test.",
        "u@example.test.far.test",
        "u@EXAMPLE.TEST.far.test.",
    ] {
        let r = last(OUTSIDER, &format!("{TX}RCPT TO:<{to}>\r\n"));
        assert_eq!(r, "554 5.7.1 Relay access denied", "{to}");
    }
    // An unquoted second @ is no address at all.
    let r = last(
        OUTSIDER,
        &format!("{TX}RCPT TO:<u@far.test@example.test>\r\n"),
    );
    assert_eq!(r, "501 5.1.3 Bad recipient address syntax");
}

#[test]
fn an_accepted_domain_matches_in_any_case_and_with_a_trailing_dot() {
    for to in ["u@EXAMPLE.TEST", "u@example.test.", "u@Example.Test."] {
        let r = last(OUTSIDER, &format!("{TX}RCPT TO:<{to}>\r\n"));
        assert_eq!(r, "250 2.1.5 Ok", "{to}");
    }
}

#[test]
fn postmaster_without_domain_is_rewritten() {
    let out = run(
        OUTSIDER,
        &format!("{TX}RCPT TO:<PostMaster>\r\nDATA\r\n.\r\n"),
    );
    assert_eq!(
        delivered(&out)[0].recipients,
        ["postmaster@mx.example.test"]
    );
}

#[test]
fn too_many_recipients() {
    let rcpts: String = (0..4)
        .map(|i| format!("RCPT TO:<u{i}@example.test>\r\n"))
        .collect();
    let r = replies(&run(OUTSIDER, &format!("{TX}{rcpts}")));
    assert_eq!(r[2..5], ["250 2.1.5 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"]);
    assert_eq!(r[5], "452 4.5.3 Too many recipients");
}

#[test]
fn duplicate_recipients_are_stored_once() {
    let rcpts = "RCPT TO:<u@example.test>\r\nRCPT TO:<u@EXAMPLE.TEST>\r\n".repeat(3);
    let out = run(OUTSIDER, &format!("{TX}{rcpts}DATA\r\n.\r\n"));
    assert!(replies(&out)[2..8].iter().all(|r| r == "250 2.1.5 Ok"));
    assert_eq!(delivered(&out)[0].recipients, ["u@example.test"]);
}

#[test]
fn too_many_commands_before_mail() {
    let mut c = (*cfg()).clone();
    c.max_commands_before_mail = 3;
    let out = run_with(
        Arc::new(c),
        OUTSIDER,
        &[b"EHLO c\r\nNOOP\r\nRSET\r\nNOOP\r\nNOOP\r\n"],
    );
    let r = replies(&out);
    assert_eq!(r.len(), 4);
    assert_eq!(r[3], "421 4.7.0 mx.example.test Error: too many commands");
    assert_eq!(out.last(), Some(&Output::Close));
}

#[test]
fn mail_resets_the_command_count() {
    let mut c = (*cfg()).clone();
    c.max_commands_before_mail = 2;
    let input = b"EHLO c\r\nNOOP\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nNOOP\r\n";
    let r = replies(&run_with(Arc::new(c), OUTSIDER, &[input]));
    assert_eq!(r.last().unwrap(), "250 2.0.0 Ok");
}

#[test]
fn too_many_errors() {
    let mut c = (*cfg()).clone();
    c.max_commands_before_mail = 100;
    let out = run_with(Arc::new(c), OUTSIDER, &["FOO\r\n".repeat(12).as_bytes()]);
    let r = replies(&out);
    assert_eq!(r.len(), 12);
    assert_eq!(r[11], "421 4.7.0 mx.example.test Error: too many errors");
    assert_eq!(out.last(), Some(&Output::Close));
}

#[test]
fn smuggled_content_is_rejected_and_session_goes_on() {
    let input = format!(
        "{TX}RCPT TO:<u@example.test>\r\nDATA\r\nhi\n.\nMAIL FROM:<x@y.test>\r\n.\r\nNOOP\r\n"
    );
    let out = run(OUTSIDER, &input);
    assert!(delivered(&out).is_empty());
    let r = replies(&out);
    assert_eq!(
        r[4..],
        ["550 5.6.0 Bare CR or LF in message content", "250 2.0.0 Ok"]
    );
}

#[test]
fn oversized_content_is_rejected_and_session_goes_on() {
    let body = "x".repeat(998) + "\r\n" + "y\r\n";
    let input = format!("{TX}RCPT TO:<u@example.test>\r\nDATA\r\n{body}.\r\nRCPT TO:<u@x>\r\n");
    let out = run(OUTSIDER, &input);
    assert!(delivered(&out).is_empty());
    let r = replies(&out);
    assert_eq!(
        r[4..],
        [
            "552 5.3.4 Message size exceeds fixed maximum",
            "503 5.5.1 Error: need MAIL command"
        ]
    );
}

#[test]
fn a_cluster_member_may_hand_on_mail_a_little_past_the_limit() {
    // A message of 1000 bytes (the limit) with a 250-byte Received header
    // that the member which accepted it added.
    let body = "R".repeat(248) + "\r\n" + &"x".repeat(998) + "\r\n";
    let input = format!(
        "EHLO m\r\nMAIL FROM:<a@b.test> SIZE=1250\r\nRCPT TO:<u@example.test>\r\nDATA\r\n{body}.\r\n"
    );
    let mut s = Session::new(cfg(), OUTSIDER);
    s.for_cluster_member();
    let mut out = Vec::new();
    s.feed(input.as_bytes(), &mut out);
    assert!(s.is_storing(), "{:?}", replies(&out));
    let ehlo = &replies(&out)[0];
    assert!(
        ehlo.contains(&format!("SIZE {}", 1000 + MEMBER_ALLOWANCE)),
        "{ehlo}"
    );
    // Anyone else: refused, at MAIL and for the content.
    let r = replies(&run(OUTSIDER, &input));
    assert_eq!(r[1], "552 5.3.4 Message size exceeds fixed maximum");
    let without_size = input.replace(" SIZE=1250", "");
    let r = replies(&run(OUTSIDER, &without_size));
    assert_eq!(r[4], "552 5.3.4 Message size exceeds fixed maximum");
}

#[test]
fn pipelined_input_waits_for_the_store() {
    let mut s = Session::new(cfg(), OUTSIDER);
    let mut out = Vec::new();
    let input = format!("{TX}RCPT TO:<u@example.test>\r\nDATA\r\nx\r\n.\r\nNOOP\r\nQUIT\r\n");
    s.feed(input.as_bytes(), &mut out);
    assert!(s.is_storing());
    assert!(matches!(out.last(), Some(Output::Deliver(_))));
    let n = out.len();
    s.feed(b"NOOP\r\n", &mut out);
    assert_eq!(
        out.len(),
        n,
        "nothing may be answered before the store result"
    );
    s.stored(Ok(QueueId(0xab)), &mut out);
    assert_eq!(
        replies(&out[n..]),
        [
            "250 2.0.0 Ok: queued as 00000000000000AB",
            "250 2.0.0 Ok",
            "221 2.0.0 mx.example.test Bye"
        ]
    );
}

#[test]
fn failed_store_acknowledges_nothing() {
    let mut s = Session::new(cfg(), OUTSIDER);
    let mut out = Vec::new();
    let input =
        format!("{TX}RCPT TO:<u@example.test>\r\nDATA\r\nx\r\n.\r\nRCPT TO:<u@example.test>\r\n");
    s.feed(input.as_bytes(), &mut out);
    let n = out.len();
    s.stored(
        Err(SpoolError::Io(std::io::Error::other("fsync"))),
        &mut out,
    );
    assert_eq!(
        replies(&out[n..]),
        [
            "451 4.3.0 Error: queue file write error",
            "503 5.5.1 Error: need MAIL command"
        ]
    );
    let mut out = Vec::new();
    let mut s = Session::new(cfg(), OUTSIDER);
    s.feed(input.as_bytes(), &mut out);
    out.clear();
    s.stored(Err(SpoolError::Full), &mut out);
    assert_eq!(
        replies(&out)[0],
        "452 4.3.1 Insufficient system storage, try again later"
    );
    let mut out = Vec::new();
    let mut s = Session::new(cfg(), OUTSIDER);
    s.feed(input.as_bytes(), &mut out);
    out.clear();
    s.stored(Err(SpoolError::Replicas { made: 1, needed: 2 }), &mut out);
    assert_eq!(
        replies(&out),
        [
            "451 4.4.0 Not enough copies of the message could be made; try again later",
            "503 5.5.1 Error: need MAIL command"
        ]
    );
}

#[test]
fn timeout_and_shutdown_close() {
    let mut s = Session::new(cfg(), OUTSIDER);
    let mut out = Vec::new();
    s.timeout(&mut out);
    assert_eq!(
        out,
        [
            Output::Reply("421 4.4.2 mx.example.test Error: timeout exceeded\r\n".into()),
            Output::Close
        ]
    );
    assert!(s.is_closed());
    let mut s = Session::new(cfg(), OUTSIDER);
    let mut out = Vec::new();
    s.shutdown(&mut out);
    s.shutdown(&mut out);
    assert_eq!(
        out,
        [
            Output::Reply("421 4.3.2 mx.example.test Service shutting down\r\n".into()),
            Output::Close
        ]
    );
}

#[path = "session_proptests.rs"]
mod proptests;

/// An address's share per minute, as the server's table gives it out.
#[derive(Debug)]
struct Share {
    messages: std::sync::atomic::AtomicUsize,
    recipients: std::sync::atomic::AtomicUsize,
}

impl crate::smtp::budget::Budget for Share {
    fn message(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.messages
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
    fn recipient(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.recipients
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[test]
fn an_address_over_its_share_is_told_to_come_back() {
    let mut s = Session::new(cfg(), OUTSIDER);
    s.with_budget(Arc::new(Share {
        messages: 1.into(),
        recipients: 1.into(),
    }));
    let mut out = Vec::new();
    s.feed(
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nRCPT TO:<v@example.test>\r\nRSET\r\nMAIL FROM:<a@b.test>\r\n",
        &mut out,
    );
    let r = replies(&out);
    assert_eq!(r[2], "250 2.1.5 Ok");
    assert_eq!(
        r[3],
        "451 4.7.1 Too many recipients from your address, try again later"
    );
    assert_eq!(
        r[5],
        "451 4.7.1 Too many messages from your address, try again later"
    );
    assert!(!s.is_closed(), "a 4xx, not a penalty");
}

/// Two sessions sharing a node's memory for bodies of `limit` bytes.
fn sharing(limit: u64) -> (Session, Session, Arc<BodyMemory>) {
    let cfg = Arc::new(SmtpConfig {
        max_message_size: 1000,
        receive_memory: limit,
        ..(*cfg()).clone()
    });
    let memory = Arc::new(BodyMemory::default());
    let mut a = Session::new(cfg.clone(), RELAY);
    let mut b = Session::new(cfg, RELAY);
    a.with_memory(memory.clone());
    b.with_memory(memory.clone());
    (a, b, memory)
}

const TO_DATA: &[u8] =
    b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n";

#[test]
fn bodies_beyond_the_nodes_memory_get_452_and_nothing_is_lost() {
    let (mut a, mut b, memory) = sharing(1500);
    let mut out_a = Vec::new();
    let mut out_b = Vec::new();
    let body = format!("{}\r\n", "x".repeat(900));
    // Both start while there is room; A holds its body until it is
    // stored, and B's then does not fit beside it.
    a.feed(TO_DATA, &mut out_a);
    b.feed(TO_DATA, &mut out_b);
    a.feed(body.as_bytes(), &mut out_a);
    b.feed(body.as_bytes(), &mut out_b);
    a.feed(b".\r\n", &mut out_a);
    assert!(a.is_storing());
    b.feed(b".\r\n", &mut out_b);
    assert!(!b.is_storing(), "nothing to store");
    assert!(
        replies(&out_b).last().unwrap().starts_with("452 4.3.1"),
        "{out_b:?}"
    );
    assert!(memory.used() > 0);
    // Stored: A's memory is given back, and B's retry goes through.
    a.stored(Ok(QueueId(1)), &mut out_a);
    assert_eq!(memory.used(), 0);
    b.feed(
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n",
        &mut out_b,
    );
    b.feed(body.as_bytes(), &mut out_b);
    b.feed(b".\r\n", &mut out_b);
    assert_eq!(delivered(&out_b).len(), 1);
    assert_eq!(delivered(&out_b)[0].body.len(), body.len());
    b.stored(Ok(QueueId(2)), &mut out_b);
    assert_eq!(memory.used(), 0);
}

#[test]
fn a_declared_size_that_does_not_fit_now_gets_452_at_mail() {
    let (mut a, mut b, _memory) = sharing(1500);
    let mut out_a = Vec::new();
    a.feed(TO_DATA, &mut out_a);
    a.feed(format!("{}\r\n", "x".repeat(900)).as_bytes(), &mut out_a);
    a.feed(b".\r\n", &mut out_a);
    let mut out = Vec::new();
    b.feed(
        b"EHLO c.test\r\nMAIL FROM:<a@b.test> SIZE=900\r\n",
        &mut out,
    );
    assert!(
        replies(&out).last().unwrap().starts_with("452 4.3.1"),
        "{out:?}"
    );
    // Without SIZE there must still be room for a first allocation.
    b.feed(b"MAIL FROM:<a@b.test>\r\n", &mut out);
    assert!(
        replies(&out).last().unwrap().starts_with("452 4.3.1"),
        "{out:?}"
    );
    // Once A's message is stored, B may start.
    a.stored(Ok(QueueId(1)), &mut out_a);
    b.feed(b"MAIL FROM:<a@b.test> SIZE=900\r\n", &mut out);
    assert_eq!(replies(&out).last().unwrap(), "250 2.1.0 Ok");
}

#[test]
fn a_closed_session_gives_its_memory_back() {
    let (mut a, _b, memory) = sharing(1 << 20);
    let mut out = Vec::new();
    a.feed(TO_DATA, &mut out);
    a.feed(b"some content\r\n", &mut out);
    assert!(memory.used() > 0);
    drop(a);
    assert_eq!(memory.used(), 0);
    // Likewise while its message is being stored (the connection broke).
    let (_, mut b, memory) = sharing(1 << 20);
    b.feed(TO_DATA, &mut out);
    b.feed(b"some content\r\n.\r\n", &mut out);
    assert!(b.is_storing() && memory.used() > 0);
    drop(b);
    assert_eq!(memory.used(), 0);
}
