//! Delivery status notifications (RFC 3464): the bounce a sender gets
//! when some of its recipients failed or expired.
//!
//! May import: `spool`.

use crate::spool::Envelope;

/// A recipient that will never be delivered and needs a DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The recipient address.
    pub address: String,
    /// The reply (or local reason) that decided it.
    pub reply: String,
    /// The next hop that answered, if any.
    pub next_hop: String,
    /// True when it failed by growing too old rather than by a 5xx.
    pub expired: bool,
}

/// A DSN ready to be queued: from the null sender to `recipient`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The original sender, who gets the report.
    pub recipient: String,
    /// The whole message, CRLF line endings.
    pub body: Vec<u8>,
}

/// The enhanced status code in `reply` ("550 5.1.1 …" → "5.1.1"), or one
/// derived from the reply's class.
pub fn status_of(reply: &str, expired: bool) -> String {
    if expired {
        return "4.4.7".into();
    }
    let mut words = reply.split([' ', '-']);
    let code = words.next().unwrap_or("");
    if let Some(esc) = words.next() {
        let parts: Vec<&str> = esc.split('.').collect();
        if parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return esc.to_string();
        }
    }
    match code.as_bytes().first() {
        Some(b'4') => "4.0.0".into(),
        _ => "5.0.0".into(),
    }
}

/// The header section of `body` (up to the first empty line).
fn headers_of(body: &[u8]) -> &[u8] {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(body.len(), |p| p + 2);
    &body[..end]
}

/// Build the DSN for `failures` of `original`; None for the null sender,
/// since a bounce is never bounced (that way lie mail loops).
pub fn build(
    reporting_mta: &str,
    original: &Envelope,
    original_body: &[u8],
    failures: &[Failure],
    date: &str,
    message_id: &str,
) -> Option<Notification> {
    if original.sender.is_empty() || failures.is_empty() {
        return None;
    }
    let boundary = format!("{}/{}", original.id, reporting_mta);
    let expired = failures.iter().all(|f| f.expired);
    let subject = if expired {
        "Undelivered Mail: delivery time expired"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    let mut m = String::new();
    let mut line = |s: &str| {
        m.push_str(s);
        m.push_str("\r\n");
    };
    line(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    ));
    line(&format!("To: <{}>", original.sender));
    line(&format!("Subject: {subject}"));
    line(&format!("Date: {date}"));
    line(&format!("Message-ID: <{message_id}>"));
    line("Auto-Submitted: auto-replied");
    line("MIME-Version: 1.0");
    line(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""
    ));
    line("");
    line("This is a MIME-encapsulated message.");
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: text/plain; charset=us-ascii");
    line("");
    line(&format!("This is the mail system at host {reporting_mta}."));
    line("");
    line("Your message could not be delivered to one or more recipients.");
    line("");
    for f in failures {
        let why = if f.expired {
            format!("delivery time expired; last reply: {}", f.reply)
        } else {
            f.reply.clone()
        };
        line(&format!("<{}>: {}", f.address, why));
    }
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: message/delivery-status");
    line("");
    line(&format!("Reporting-MTA: dns; {reporting_mta}"));
    line(&format!("X-Mtad-Queue-ID: {}", original.id));
    line("");
    for f in failures {
        line(&format!("Final-Recipient: rfc822; {}", f.address));
        line("Action: failed");
        line(&format!("Status: {}", status_of(&f.reply, f.expired)));
        if !f.next_hop.is_empty() {
            line(&format!("Remote-MTA: dns; {}", f.next_hop));
        }
        if !f.reply.is_empty() {
            line(&format!("Diagnostic-Code: smtp; {}", f.reply.trim_end()));
        }
        line("");
    }
    line(&format!("--{boundary}"));
    line("Content-Type: text/rfc822-headers");
    line("");
    m.push_str(&String::from_utf8_lossy(headers_of(original_body)));
    m.push_str("\r\n");
    m.push_str(&format!("--{boundary}--\r\n"));
    Some(Notification {
        recipient: original.sender.clone(),
        body: m.into_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{QueueId, RcptState, Recipient};

    fn original(sender: &str) -> Envelope {
        Envelope {
            id: QueueId(0xABC),
            sender: sender.into(),
            recipients: vec![Recipient {
                address: "x@dest.example".into(),
                state: RcptState::Done,
            }],
            arrived_ms: 0,
            holders: Vec::new(),
        }
    }

    fn failure(expired: bool) -> Failure {
        Failure {
            address: "x@dest.example".into(),
            reply: "550 5.1.1 <x@dest.example>: user unknown".into(),
            next_hop: "127.0.0.1:2526".into(),
            expired,
        }
    }

    const BODY: &[u8] = b"Subject: hello\r\nFrom: a@example.test\r\n\r\nsecret body\r\n";

    #[test]
    fn a_bounce_is_a_multipart_report_to_the_sender() {
        let n = build(
            "mx.example.test",
            &original("a@example.test"),
            BODY,
            &[failure(false)],
            "D",
            "id@x",
        )
        .unwrap();
        assert_eq!(n.recipient, "a@example.test");
        let text = String::from_utf8(n.body).unwrap();
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains(
            "Final-Recipient: rfc822; x@dest.example\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 <x@dest.example>: user unknown"));
        assert!(text.contains("Remote-MTA: dns; 127.0.0.1:2526"));
        // The original headers come back, its body does not.
        assert!(text.contains("Subject: hello\r\n"));
        assert!(!text.contains("secret body"));
        assert!(text.ends_with("--0000000000000ABC/mx.example.test--\r\n"));
        assert!(!text.replace("\r\n", "").contains('\n'), "bare LF in DSN");
    }

    #[test]
    fn expiry_reports_4_4_7() {
        let n = build(
            "h",
            &original("a@example.test"),
            BODY,
            &[failure(true)],
            "D",
            "i",
        )
        .unwrap();
        let text = String::from_utf8(n.body).unwrap();
        assert!(text.contains("Status: 4.4.7"));
        assert!(text.contains("Subject: Undelivered Mail: delivery time expired"));
    }

    #[test]
    fn the_null_sender_never_gets_a_bounce() {
        assert_eq!(
            build("h", &original(""), BODY, &[failure(false)], "D", "i"),
            None
        );
    }

    #[test]
    fn status_codes_come_from_the_reply_or_its_class() {
        assert_eq!(status_of("550 5.7.1 denied", false), "5.7.1");
        assert_eq!(status_of("554 no esc here", false), "5.0.0");
        assert_eq!(status_of("451 try later", false), "4.0.0");
        assert_eq!(status_of("250-2.1.5 ok", false), "2.1.5");
    }
}
