use super::*;
use crate::delivery::Outcome::{Deferred, Delivered, Failed};

const GREET: &[u8] = b"220 mx.test ESMTP\r\n";
const EHLO_PIPE: &[u8] =
    b"250-mx.test hello\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME\r\n";
const EHLO_PLAIN: &[u8] = b"250-mx.test hello\r\n250 SIZE\r\n";

fn rcpts(n: usize) -> Vec<JobRcpt> {
    (0..n)
        .map(|i| JobRcpt {
            index: i + 3,
            address: format!("r{i}@dest.test"),
        })
        .collect()
}

/// One transaction of a scripted session: recipients, body, server replies.
struct Tx<'a> {
    rcpts: Vec<JobRcpt>,
    body: &'a [u8],
    replies: &'a [u8],
}

/// Everything the client did: bytes written and the other actions, in order.
#[derive(Debug, PartialEq)]
struct Trace {
    sent: Vec<u8>,
    events: Vec<Action>,
}

fn record(trace: &mut Trace, actions: Vec<Action>) {
    for a in actions {
        match a {
            Action::Send(b) => trace.sent.extend_from_slice(&b),
            other => trace.events.push(other),
        }
    }
}

/// Run a session; `split` cuts each server segment into the reads it arrives in.
fn run(setup: &[u8], txs: &[Tx], split: &dyn Fn(&[u8]) -> Vec<Vec<u8>>) -> Trace {
    let mut c = Client::new("client.test");
    let mut t = Trace {
        sent: Vec::new(),
        events: Vec::new(),
    };
    for chunk in split(setup) {
        let a = c.receive(&chunk);
        record(&mut t, a);
    }
    for tx in txs {
        if !c.is_ready() {
            break;
        }
        let a = c.start("s@src.test", &tx.rcpts, Bytes::copy_from_slice(tx.body));
        record(&mut t, a.unwrap());
        for chunk in split(tx.replies) {
            let a = c.receive(&chunk);
            record(&mut t, a);
        }
    }
    t
}

/// Run the session whole, at every single split point of every segment, and
/// one byte at a time; all must behave the same. Returns the trace.
fn check(setup: &[u8], txs: &[Tx]) -> Trace {
    let whole = run(setup, txs, &|b| vec![b.to_vec()]);
    let bytewise = run(setup, txs, &|b| b.iter().map(|x| vec![*x]).collect());
    assert_eq!(whole, bytewise, "byte-at-a-time differs");
    let longest = txs.iter().map(|t| t.replies.len()).max().unwrap_or(0);
    for k in 0..=setup.len().max(longest) {
        let split = move |b: &[u8]| {
            let k = k.min(b.len());
            vec![b[..k].to_vec(), b[k..].to_vec()]
        };
        assert_eq!(whole, run(setup, txs, &split), "split at {k} differs");
    }
    whole
}

fn setup(ehlo: &[u8]) -> Vec<u8> {
    [GREET, ehlo].concat()
}

fn dones(t: &Trace) -> Vec<&TxDone> {
    t.events
        .iter()
        .filter_map(|a| match a {
            Action::Done(d) => Some(d),
            _ => None,
        })
        .collect()
}

fn outcomes(d: &TxDone) -> Vec<(usize, Outcome, &str)> {
    d.results
        .iter()
        .map(|r| (r.index, r.outcome, r.reply.as_str()))
        .collect()
}

fn sent(t: &Trace) -> String {
    String::from_utf8_lossy(&t.sent).into_owned()
}

#[test]
fn pipelined_transaction_goes_out_in_one_write() {
    let mut c = Client::new("client.test");
    let mut a = c.receive(GREET);
    assert_eq!(
        a,
        vec![Action::Send(Bytes::from_static(b"EHLO client.test\r\n"))]
    );
    a = c.receive(EHLO_PIPE);
    let caps = Capabilities {
        pipelining: true,
        size: Some(100000),
        eight_bit_mime: true,
        starttls: false,
    };
    assert_eq!(a, vec![Action::Established(caps)]);
    let a = c
        .start("s@src.test", &rcpts(2), Bytes::from_static(b"Hi\r\n"))
        .unwrap();
    assert_eq!(
        a,
        vec![Action::Send(Bytes::from_static(
            b"MAIL FROM:<s@src.test> SIZE=4\r\nRCPT TO:<r0@dest.test>\r\nRCPT TO:<r1@dest.test>\r\nDATA\r\n"
        ))]
    );
}

#[test]
fn pipelined_accept_all() {
    let t = check(
        &setup(EHLO_PIPE),
        &[Tx {
            rcpts: rcpts(2),
            body: b"Subject: x\r\n\r\nHi\r\n",
            replies: b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n250 2.0.0 Ok: queued as X\r\n",
        }],
    );
    assert_eq!(
        sent(&t),
        "EHLO client.test\r\nMAIL FROM:<s@src.test> SIZE=18\r\nRCPT TO:<r0@dest.test>\r\n\
         RCPT TO:<r1@dest.test>\r\nDATA\r\nSubject: x\r\n\r\nHi\r\n.\r\n"
    );
    let d = dones(&t);
    assert_eq!(d.len(), 1);
    assert!(d[0].progress);
    let ok = "250 2.0.0 Ok: queued as X";
    assert_eq!(outcomes(d[0]), vec![(3, Delivered, ok), (4, Delivered, ok)]);
}

#[test]
fn non_pipelined_waits_for_each_reply_and_second_tx_needs_no_rset() {
    let tx = |body: &'static [u8]| Tx {
        rcpts: rcpts(2),
        body,
        replies: b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n250 done\r\n",
    };
    let t = check(&setup(EHLO_PLAIN), &[tx(b"a\r\n"), tx(b"b\r\n")]);
    let one = "MAIL FROM:<s@src.test> SIZE=3\r\nRCPT TO:<r0@dest.test>\r\nRCPT TO:<r1@dest.test>\r\nDATA\r\n";
    assert_eq!(
        sent(&t),
        format!("EHLO client.test\r\n{one}a\r\n.\r\n{one}b\r\n.\r\n")
    );
    assert_eq!(dones(&t).len(), 2);
    // A non-pipelining peer sees one command per write.
    let mut c = Client::new("h");
    c.receive(&setup(EHLO_PLAIN));
    let a = c
        .start("s@src.test", &rcpts(2), Bytes::from_static(b"x\r\n"))
        .unwrap();
    assert_eq!(
        a,
        vec![Action::Send(Bytes::from_static(
            b"MAIL FROM:<s@src.test> SIZE=3\r\n"
        ))]
    );
    let a = c.receive(b"250 Ok\r\n");
    assert_eq!(
        a,
        vec![Action::Send(Bytes::from_static(
            b"RCPT TO:<r0@dest.test>\r\n"
        ))]
    );
}

#[test]
fn ehlo_rejected_falls_back_to_helo() {
    let setup = [
        GREET,
        b"502 5.5.2 EHLO not supported\r\n",
        b"250 mx.test\r\n",
    ]
    .concat();
    let t = check(
        &setup,
        &[Tx {
            rcpts: rcpts(1),
            body: b"x\r\n",
            replies: b"250 Ok\r\n250 Ok\r\n354 go\r\n250 Ok\r\n",
        }],
    );
    assert!(
        sent(&t).starts_with("EHLO client.test\r\nHELO client.test\r\nMAIL FROM:<s@src.test>\r\n")
    );
    assert_eq!(t.events[0], Action::Established(Capabilities::default()));
    assert_eq!(outcomes(dones(&t)[0]), vec![(3, Delivered, "250 Ok")]);
}

#[test]
fn refused_greeting_helo_or_ehlo_ends_session() {
    for (script, code) in [
        (&b"554 5.3.2 go away\r\n"[..], 554),
        (b"421-4.3.2 busy\r\n421 4.3.2 try later\r\n", 421),
        (b"220 hi\r\n421 4.3.2 shutting down\r\n", 421),
        (b"220 hi\r\n500 what\r\n501 no HELO either\r\n", 501),
    ] {
        let t = check(script, &[]);
        match t.events.last() {
            Some(Action::Closed(SessionEnd::Refused(r))) => assert_eq!(r.code, code),
            other => panic!("{other:?}"),
        }
    }
    let t = check(b"421-4.3.2 busy\r\n421 4.3.2 try later\r\n", &[]);
    assert_eq!(
        t.events,
        vec![Action::Closed(SessionEnd::Refused(Reply {
            code: 421,
            text: "421 4.3.2 busy try later".into()
        }))]
    );
}

#[test]
fn per_recipient_outcomes() {
    for ehlo in [EHLO_PIPE, EHLO_PLAIN] {
        let t = check(
            &setup(ehlo),
            &[Tx {
                rcpts: rcpts(3),
                body: b"x\r\n",
                replies: b"250 Ok\r\n250 2.1.5 Ok\r\n451 4.7.1 greylisted\r\n550 5.1.1 unknown\r\n354 go\r\n250 2.0.0 Ok\r\n",
            }],
        );
        assert_eq!(
            outcomes(dones(&t)[0]),
            vec![
                (3, Delivered, "250 2.0.0 Ok"),
                (4, Deferred, "451 4.7.1 greylisted"),
                (5, Failed, "550 5.1.1 unknown"),
            ]
        );
    }
}

#[test]
fn mail_rejected_decides_everyone_and_next_tx_starts_with_rset() {
    for (ehlo, replies, code, outcome) in [
        (EHLO_PIPE, &b"451 4.3.0 later\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no MAIL\r\n554 5.5.1 no valid recipients\r\n"[..], 451, Deferred),
        (EHLO_PIPE, b"553 5.7.1 sender refused\r\n503 no\r\n503 no\r\n503 no\r\n", 553, Failed),
        (EHLO_PLAIN, b"451 4.3.0 later\r\n", 451, Deferred),
        (EHLO_PLAIN, b"553 5.7.1 sender refused\r\n", 553, Failed),
    ] {
        let second = Tx {
            rcpts: rcpts(1),
            body: b"y\r\n",
            replies: b"250 reset\r\n250 Ok\r\n250 Ok\r\n354 go\r\n250 Ok\r\n",
        };
        let first = Tx {
            rcpts: rcpts(2),
            body: b"x\r\n",
            replies,
        };
        let t = check(&setup(ehlo), &[first, second]);
        let d = dones(&t);
        assert!(!d[0].progress);
        assert!(d[0].results.iter().all(|r| r.outcome == outcome && r.reply.starts_with(&code.to_string())));
        assert_eq!(outcomes(d[1]), vec![(3, Delivered, "250 Ok")]);
        let s = sent(&t);
        let second_cmds = &s[s.rfind("RSET").expect("RSET before the second MAIL")..];
        assert!(second_cmds.starts_with("RSET\r\nMAIL FROM"), "{s}");
        if ehlo == EHLO_PLAIN {
            assert!(!s.contains("RCPT TO:<r1"), "no RCPT after a refused MAIL: {s}");
        }
        assert!(!s.contains("x\r\n.\r\n"), "no body after a refused MAIL: {s}");
    }
}

#[test]
fn no_recipient_accepted_sends_no_body() {
    // Pipelined: DATA refused (RFC 2920 §3.1) or, from a lax server, 354.
    for (ehlo, replies) in [
        (
            EHLO_PIPE,
            &b"250 Ok\r\n550 no\r\n451 later\r\n554 5.5.1 no valid recipients\r\n"[..],
        ),
        (
            EHLO_PIPE,
            b"250 Ok\r\n550 no\r\n451 later\r\n354 go\r\n250 empty message\r\n",
        ),
        (EHLO_PLAIN, b"250 Ok\r\n550 no\r\n451 later\r\n"),
    ] {
        let t = check(
            &setup(ehlo),
            &[
                Tx {
                    rcpts: rcpts(2),
                    body: b"secret\r\n",
                    replies,
                },
                Tx {
                    rcpts: rcpts(1),
                    body: b"y\r\n",
                    replies: b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n250 Ok\r\n",
                },
            ],
        );
        let s = sent(&t);
        assert!(!s.contains("secret"), "{s}");
        if ehlo == EHLO_PLAIN {
            assert!(!s.contains("DATA\r\nRSET"), "{s}");
        }
        assert!(s.contains("RSET\r\nMAIL"), "{s}");
        let d = dones(&t);
        assert_eq!(
            outcomes(d[0]),
            vec![(3, Failed, "550 no"), (4, Deferred, "451 later")]
        );
        assert!(d[0].progress);
        assert_eq!(outcomes(d[1]), vec![(3, Delivered, "250 Ok")]);
    }
}

#[test]
fn data_and_final_replies_decide_accepted_recipients() {
    for (ehlo, replies, outcome, reply) in [
        (
            EHLO_PIPE,
            &b"250 Ok\r\n250 Ok\r\n451 4.3.0 not now\r\n"[..],
            Deferred,
            "451 4.3.0 not now",
        ),
        (
            EHLO_PLAIN,
            b"250 Ok\r\n250 Ok\r\n554 5.3.0 never\r\n",
            Failed,
            "554 5.3.0 never",
        ),
        (
            EHLO_PIPE,
            b"250 Ok\r\n250 Ok\r\n354 go\r\n452 4.3.1 full\r\n",
            Deferred,
            "452 4.3.1 full",
        ),
        (
            EHLO_PLAIN,
            b"250 Ok\r\n250 Ok\r\n354 go\r\n554 5.6.0 content refused\r\n",
            Failed,
            "554 5.6.0 content refused",
        ),
        // A 2xx to DATA itself: the content never went, nothing was
        // delivered, whatever the server claims.
        (
            EHLO_PIPE,
            b"250 Ok\r\n250 Ok\r\n250 2.0.0 queued\r\n",
            Deferred,
            "451 4.5.0 the next hop answered DATA with 250 before the content was sent",
        ),
    ] {
        let t = check(
            &setup(ehlo),
            &[Tx {
                rcpts: rcpts(1),
                body: b"x\r\n",
                replies,
            }],
        );
        let d = dones(&t);
        assert_eq!(outcomes(d[0]), vec![(3, outcome, reply)]);
        assert!(d[0].progress);
    }
}

#[test]
fn service_closing_mid_transaction_defers_and_closes() {
    let replies = b"250 Ok\r\n550 5.1.1 unknown\r\n421 4.3.2 closing\r\n";
    for ehlo in [EHLO_PIPE, EHLO_PLAIN] {
        let t = check(
            &setup(ehlo),
            &[Tx {
                rcpts: rcpts(3),
                body: b"x\r\n",
                replies,
            }],
        );
        let close = "421 4.3.2 closing";
        assert_eq!(
            outcomes(dones(&t)[0]),
            vec![
                (3, Failed, "550 5.1.1 unknown"),
                (4, Deferred, close),
                (5, Deferred, close)
            ]
        );
        assert_eq!(
            t.events.last(),
            Some(&Action::Closed(SessionEnd::Closing(Reply {
                code: 421,
                text: close.into()
            })))
        );
    }
    // After the body, the 421 decides the accepted recipients.
    let t = check(
        &setup(EHLO_PIPE),
        &[Tx {
            rcpts: rcpts(1),
            body: b"x\r\n",
            replies: b"250 Ok\r\n250 Ok\r\n354 go\r\n421 4.4.2 timeout\r\n",
        }],
    );
    assert_eq!(
        outcomes(dones(&t)[0]),
        vec![(3, Deferred, "421 4.4.2 timeout")]
    );
}

#[test]
fn service_closing_while_idle() {
    let mut c = Client::new("h");
    c.receive(&setup(EHLO_PIPE));
    let a = c.receive(b"421 4.4.2 idle too long\r\n");
    assert!(matches!(&a[..], [Action::Closed(SessionEnd::Closing(r))] if r.code == 421));
    assert!(c.is_closed());
    assert_eq!(
        c.start("s", &rcpts(1), Bytes::new()),
        Err(ClientError::NotReady)
    );
}

#[test]
fn garbage_reply_is_a_protocol_error() {
    let mut c = Client::new("h");
    c.receive(&setup(EHLO_PIPE));
    c.start("s", &rcpts(1), Bytes::from_static(b"x\r\n"))
        .unwrap();
    let a = c.receive(b"250 Ok\r\nHTTP/1.1 400 Bad\r\n");
    match &a[..] {
        [Action::Done(d), Action::Closed(SessionEnd::Protocol(_))] => {
            assert_eq!(d.results[0].outcome, Deferred);
            assert!(d.results[0].reply.starts_with("451 4.5.0"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn abort_defers_undecided_recipients() {
    let mut c = Client::new("h");
    c.receive(&setup(EHLO_PIPE));
    c.start("s", &rcpts(2), Bytes::from_static(b"x\r\n"))
        .unwrap();
    c.receive(b"250 Ok\r\n550 no\r\n250 Ok\r\n354 go\r\n");
    let d = c
        .abort(&Reply::local(451, "4.4.2 connection lost"))
        .unwrap();
    assert_eq!(
        outcomes(&d),
        vec![
            (3, Failed, "550 no"),
            (4, Deferred, "451 4.4.2 connection lost")
        ]
    );
    assert!(c.is_closed());
    assert_eq!(c.abort(&Reply::local(451, "x")), None);
}

#[test]
fn multi_line_replies_with_status_codes() {
    let t = check(
        &setup(EHLO_PIPE),
        &[Tx {
            rcpts: rcpts(1),
            body: b"x\r\n",
            replies: b"250 Ok\r\n550-5.7.1 Relaying denied\r\n550-5.7.1 see http://x/\r\n550 5.7.1 bye\r\n554 no rcpts\r\n",
        }],
    );
    assert_eq!(
        outcomes(dones(&t)[0]),
        vec![(3, Failed, "550 5.7.1 Relaying denied see http://x/ bye")]
    );
}

#[test]
fn eight_bit_body_and_size_limit() {
    let mut c = Client::new("h");
    c.receive(&setup(EHLO_PIPE));
    let a = c
        .start("s", &rcpts(1), Bytes::from_static("é\r\n".as_bytes()))
        .unwrap();
    let Action::Send(b) = &a[0] else { panic!() };
    assert!(b.starts_with(b"MAIL FROM:<s> SIZE=4 BODY=8BITMIME\r\n"));

    let mut c = Client::new("h");
    c.receive(&setup(EHLO_PLAIN));
    let a = c
        .start("s", &rcpts(1), Bytes::from_static("é\r\n".as_bytes()))
        .unwrap();
    assert_eq!(
        a,
        vec![Action::Send(Bytes::from_static(
            b"MAIL FROM:<s> SIZE=4\r\n"
        ))]
    );

    let mut c = Client::new("h");
    c.receive(&setup(b"250-mx\r\n250 SIZE 10\r\n"));
    let a = c.start("", &rcpts(1), Bytes::from(vec![b'a'; 11])).unwrap();
    match &a[..] {
        [Action::Done(d)] => assert_eq!(d.results[0].outcome, Failed),
        other => panic!("{other:?}"),
    }
    assert!(c.is_ready(), "a local refusal leaves the session usable");
}

#[test]
fn dot_stuffing() {
    assert_eq!(
        &stuff(b".a\r\n..b\r\nc.\r\n.\r\n")[..],
        b"..a\r\n...b\r\nc.\r\n..\r\n.\r\n"
    );
    assert_eq!(&stuff(b"no newline")[..], b"no newline\r\n.\r\n");
    assert_eq!(&stuff(b"")[..], b".\r\n");
    assert_eq!(&stuff(b"x\r")[..], b"x\r\n.\r\n");
}

#[test]
fn quit() {
    let mut c = Client::new("h");
    c.receive(&setup(EHLO_PIPE));
    assert_eq!(&c.quit()[..], b"QUIT\r\n");
    assert_eq!(
        c.receive(b"221 2.0.0 bye\r\n"),
        vec![Action::Closed(SessionEnd::Quit)]
    );
    assert!(c.receive(b"250 late\r\n").is_empty());
}

#[test]
fn rset_refused_defers_and_closes() {
    let t = check(
        &setup(EHLO_PIPE),
        &[
            Tx {
                rcpts: rcpts(1),
                body: b"x\r\n",
                replies: b"451 later\r\n503 no\r\n503 no\r\n",
            },
            Tx {
                rcpts: rcpts(1),
                body: b"y\r\n",
                replies: b"502 5.5.1 no RSET\r\n250 Ok\r\n",
            },
        ],
    );
    let d = dones(&t);
    assert_eq!(d[1].results[0].outcome, Deferred);
    assert!(!d[1].progress);
    assert!(matches!(
        t.events.last(),
        Some(Action::Closed(SessionEnd::Closing(_)))
    ));
}

const EHLO_TLS: &[u8] = b"250-mx.test hello\r\n250-PIPELINING\r\n250 STARTTLS\r\n";

fn written(a: &[Action]) -> String {
    a.iter()
        .filter_map(|a| match a {
            Action::Send(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}

fn refused_text(a: &[Action]) -> String {
    match a.last() {
        Some(Action::Closed(SessionEnd::Refused(r))) => r.text.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn starttls_when_offered_then_ehlo_again_over_tls() {
    for want in [WantTls::IfOffered, WantTls::Must] {
        let mut c = Client::with_tls("h", want);
        c.receive(GREET);
        assert_eq!(written(&c.receive(EHLO_TLS)), "STARTTLS\r\n");
        assert_eq!(c.receive(b"220 2.0.0 go ahead\r\n"), vec![Action::StartTls]);
        assert!(c.receive(b"").is_empty());
        assert_eq!(written(&c.tls_started()), "EHLO h\r\n");
        assert!(c.is_tls());
        // The server offers STARTTLS again (some do): not twice.
        let a = c.receive(EHLO_TLS);
        assert!(
            matches!(a[..], [Action::Established(caps)] if caps.pipelining),
            "{a:?}"
        );
    }
}

#[test]
fn without_starttls_opportunistic_goes_on_and_required_defers() {
    let mut c = Client::with_tls("h", WantTls::IfOffered);
    c.receive(GREET);
    assert!(matches!(c.receive(EHLO_PIPE)[..], [Action::Established(_)]));
    assert!(!c.is_tls());

    let mut c = Client::with_tls("h", WantTls::Must);
    c.receive(GREET);
    let t = refused_text(&c.receive(EHLO_PIPE));
    assert!(
        t.starts_with("451 4.7.4") && t.contains("not offered"),
        "{t}"
    );

    // Refused STARTTLS: plaintext for opportunistic, a deferral otherwise.
    let mut c = Client::with_tls("h", WantTls::IfOffered);
    c.receive(GREET);
    c.receive(EHLO_TLS);
    assert!(matches!(
        c.receive(b"454 4.7.0 TLS not available\r\n")[..],
        [Action::Established(_)]
    ));
    let mut c = Client::with_tls("h", WantTls::Must);
    c.receive(GREET);
    c.receive(EHLO_TLS);
    let t = refused_text(&c.receive(b"454 4.7.0 TLS not available\r\n"));
    assert!(t.starts_with("451 4.7.4") && t.contains("454"), "{t}");
    // No EHLO, no STARTTLS: a required route does not fall back to HELO.
    let mut c = Client::with_tls("h", WantTls::Must);
    c.receive(GREET);
    assert!(refused_text(&c.receive(b"502 5.5.1 no EHLO\r\n")).starts_with("451 4.7.4"));
    // A plaintext route never asks.
    let mut c = Client::new("h");
    c.receive(GREET);
    assert!(matches!(c.receive(EHLO_TLS)[..], [Action::Established(_)]));
}

/// A reply smuggled in plaintext behind the 220 (the client-side twin of
/// CVE-2011-0411) ends the session instead of being read as if over TLS.
#[test]
fn a_reply_injected_behind_the_220_ends_the_session() {
    let mut c = Client::with_tls("h", WantTls::Must);
    c.receive(GREET);
    c.receive(EHLO_TLS);
    let a = c.receive(b"220 2.0.0 go ahead\r\n250 injected\r\n");
    assert_eq!(a[0], Action::StartTls);
    assert!(
        matches!(a.last(), Some(Action::Closed(SessionEnd::Protocol(_)))),
        "{a:?}"
    );
    assert!(
        c.tls_started().is_empty(),
        "no handshake for a closed session"
    );
}
