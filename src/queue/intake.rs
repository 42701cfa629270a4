//! Intake: turns an SMTP transaction into a durable, queued message. The
//! SMTP side hands it what a client sent; it adds the Received header,
//! stores the message in the spool and admits it to the queue, so "250"
//! is only said for mail that is on disk and will be delivered.

use std::sync::Arc;

use bytes::BytesMut;

use super::QueueHandle;
use crate::events;
use crate::smtp::{Accept, Incoming};
use crate::spool::{Envelope, IdGen, QueueId, RcptState, Recipient, Spool, SpoolError};

/// Turns an SMTP transaction into a durable, queued message.
pub struct Intake {
    spool: Arc<dyn Spool>,
    queue: QueueHandle,
    ids: Arc<IdGen>,
    hostname: String,
}

impl Intake {
    /// Store into `spool` and admit to `queue`, numbering messages from
    /// `ids`; `hostname` is the name the Received header says took them.
    pub fn new(
        spool: Arc<dyn Spool>,
        queue: QueueHandle,
        ids: Arc<IdGen>,
        hostname: String,
    ) -> Intake {
        Intake {
            spool,
            queue,
            ids,
            hostname,
        }
    }

    fn received_header(&self, m: &Incoming, id: QueueId) -> String {
        let date = jiff::fmt::rfc2822::to_string(&jiff::Zoned::now()).unwrap_or_default();
        // The client's words go into a header: keep only printable ASCII.
        let helo: String = m.helo.chars().filter(|c| c.is_ascii_graphic()).collect();
        let helo = if helo.is_empty() { "unknown" } else { &helo };
        let rcpt = match m.recipients.as_slice() {
            [one] => format!("\r\n\tfor <{one}>"),
            _ => String::new(),
        };
        // RFC 3848: S for TLS, A for an authenticated client.
        let with = match (m.tls, m.user.is_some()) {
            (true, true) => "ESMTPSA",
            (true, false) => "ESMTPS",
            (false, true) => "ESMTPA",
            (false, false) => "ESMTP",
        };
        format!(
            "Received: from {helo} ([{}])\r\n\tby {} (mtad) with {with} id {id}{rcpt};\r\n\t{date}\r\n",
            m.client_ip, self.hostname
        )
    }
}

impl Accept for Intake {
    fn accept(
        &self,
        mut m: Incoming,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<QueueId, SpoolError>> + Send + '_>>
    {
        Box::pin(async move {
            let id = self.ids.next();
            let header = self.received_header(&m, id);
            let mut body = BytesMut::with_capacity(header.len() + m.body.len());
            body.extend_from_slice(header.as_bytes());
            body.extend_from_slice(&m.body);
            // Not kept through the store: the copy is what goes to disk.
            drop(std::mem::take(&mut m.body));
            let envelope = Envelope {
                id,
                sender: m.sender,
                recipients: m
                    .recipients
                    .into_iter()
                    .map(|address| Recipient {
                        address,
                        state: RcptState::Pending { attempts: 0 },
                    })
                    .collect(),
                arrived_ms: crate::clock::now_ms(),
            };
            self.spool.store(envelope.clone(), body.freeze()).await?;
            let rcpts: Vec<&str> = envelope
                .recipients
                .iter()
                .map(|r| r.address.as_str())
                .collect();
            let reply = format!("250 2.0.0 Ok: queued as {id}");
            let client = m.client_ip.to_string();
            let user = m.user.as_deref().unwrap_or("");
            events::received(
                id,
                &envelope.sender,
                &rcpts.join(","),
                &client,
                user,
                &reply,
            );
            self.queue.admit(envelope);
            Ok(id)
        })
    }
}
