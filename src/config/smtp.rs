//! Reading `[smtp]`: where mail is accepted, from whom, for which domains,
//! with which limits, TLS and authentication.

use std::path::PathBuf;

use super::reader::{domain, duration_or, int_or, Ctx, Fields, Span};
use super::SmtpConfig;

/// An accepted domain and where it was written, for the routing check.
pub(super) struct Placed {
    pub(super) domain: String,
    pub(super) span: Span,
    pub(super) path: String,
}

pub(super) fn read_smtp(
    ctx: &mut Ctx<'_>,
    mut f: Fields<'_>,
    accept: &mut Vec<Placed>,
    groups: &[super::GroupConfig],
) -> SmtpConfig {
    let listen = match f.take("listen") {
        Some(n) => {
            let what = "a non-empty list of socket addresses like [\"127.0.0.1:2525\"]";
            // Port 0 (any free port) is allowed for listening: tests use it.
            let listen = ctx
                .list(&n, what, true, |ctx, e| ctx.socket_addr(e, true))
                .unwrap_or_default();
            // A node address that covers a group's VIP and port would keep
            // the group from ever binding there.
            for a in &listen {
                for g in groups {
                    let Some(vip) = g.vip else { continue };
                    let covers = a.ip().is_unspecified() || a.ip() == vip.addr();
                    if covers && a.port() == g.smtp_port {
                        let msg = format!(
                            "{a} takes port {} on the VIP of group \"{}\": the group could never listen there",
                            g.smtp_port, g.name
                        );
                        ctx.error(&n.span, &n.path, msg);
                    }
                }
            }
            listen
        }
        // With groups, SMTP is served on their VIPs: no node address
        // unless one is configured.
        None if groups.is_empty() => vec![([127, 0, 0, 1], 2525).into()],
        None => Vec::new(),
    };
    let hostname = f
        .take("hostname")
        .and_then(|n| domain(ctx, &n, "a domain name like \"mx.example.test\""))
        .unwrap_or_else(|| "localhost".to_string());
    let backlog = int_or(ctx, &mut f, "backlog", 1, 65535, 4096) as u32;
    let max_connections = int_or(ctx, &mut f, "max_connections", 1, i64::MAX, 10_000) as usize;
    let d = super::ClientLimits::default();
    let mut count = |key: &'static str, default: usize| {
        int_or(ctx, &mut f, key, 1, i64::MAX, default as i64) as usize
    };
    let connections_per_client = count("max_connections_per_client", d.connections_per_client);
    let connection_rate_per_client = count(
        "max_connection_rate_per_client",
        d.connection_rate_per_client,
    );
    let messages_per_client = count("max_messages_per_client", d.messages_per_client);
    let recipients_per_client = count("max_recipients_per_client", d.recipients_per_client);
    let limits = super::ClientLimits {
        connections_per_client,
        connection_rate_per_client,
        max_session_time: duration_or(
            ctx,
            &mut f,
            "max_session_time",
            d.max_session_time.as_secs(),
        ),
        messages_per_client,
        recipients_per_client,
    };
    let max_message_size = f
        .take("max_message_size")
        .and_then(|n| ctx.size(&n, 1024))
        .unwrap_or(50 * 1024 * 1024);
    let receive_memory = f
        .take("receive_memory")
        .and_then(|n| {
            let bytes = ctx.size(&n, 1024)?;
            if bytes < max_message_size {
                let msg = format!(
                    "must be at least max_message_size ({max_message_size} bytes): \
                     a message of the largest size could never be received"
                );
                ctx.error(&n.span, &n.path, &msg);
            }
            Some(bytes)
        })
        .unwrap_or((1 << 30).max(max_message_size.saturating_mul(2)));
    let max_recipients = int_or(ctx, &mut f, "max_recipients", 1, i64::MAX, 1000) as usize;
    let max_commands_before_mail =
        int_or(ctx, &mut f, "max_commands_before_mail", 1, i64::MAX, 100) as usize;
    // RFC 5321 4.5.3.2.7: a server should wait at least 5 minutes for a command.
    let idle_timeout = duration_or(ctx, &mut f, "idle_timeout", 300);
    let relay_networks = f
        .take("relay_networks")
        .and_then(|n| {
            let what = "a list of networks like [\"127.0.0.0/8\"]";
            ctx.list(&n, what, false, |ctx, e| ctx.cidr(e))
        })
        .unwrap_or_else(|| {
            vec![
                "127.0.0.0/8".parse().expect("valid"),
                "::1/128".parse().expect("valid"),
            ]
        });
    let accept_domains = f
        .take("accept_domains")
        .and_then(|n| {
            let what = "a list of domains like [\"example.test\"]";
            ctx.list(&n, what, false, |ctx, e| {
                if e.item.value().and_then(|v| v.as_str()) == Some("*") {
                    let msg = "\"*\" is not allowed here: accepting mail for every domain \
                               from anyone would make an open relay; list the domains, \
                               and put trusted clients in relay_networks";
                    ctx.error(&e.span, &e.path, msg);
                    return None;
                }
                let d = domain(ctx, e, "a domain name like \"example.test\"")?;
                accept.push(Placed {
                    domain: d.clone(),
                    span: e.span.clone(),
                    path: e.path.clone(),
                });
                Some(d)
            })
        })
        .unwrap_or_default();
    let tls = f.take("tls").and_then(|n| ctx.table(&n)).map(|mut t| {
        let mut path = |ctx: &mut Ctx<'_>, key: &'static str, example: &str| {
            t.require(ctx, key)
                .and_then(|n| ctx.string(&n, &format!("a file path like \"{example}\"")))
                .map(PathBuf::from)
                .unwrap_or_default()
        };
        let cert = path(ctx, "cert", "/etc/mtad/cert.pem");
        let key = path(ctx, "key", "/etc/mtad/key.pem");
        let require_tls = t
            .take("require_tls")
            .and_then(|n| ctx.boolean(&n))
            .unwrap_or(false);
        let implicit_listen = t
            .take("implicit_listen")
            .and_then(|n| {
                let what = "a list of socket addresses like [\"0.0.0.0:465\"]";
                ctx.list(&n, what, false, |ctx, e| ctx.socket_addr(e, true))
            })
            .unwrap_or_default();
        t.finish(ctx);
        super::InboundTls {
            cert,
            key,
            require_tls,
            implicit_listen,
        }
    });
    let auth = f
        .take("auth")
        .and_then(|n| ctx.table(&n))
        .and_then(|mut t| {
            let file = t
                .require(ctx, "credentials")
                .and_then(|n| ctx.string(&n, "a file path like \"/etc/mtad/passwd\""));
            if tls.is_none() {
                let msg = "SMTP AUTH is offered only over TLS: configure [smtp.tls] too";
                ctx.error(&t.span, &t.path, msg);
            }
            t.finish(ctx);
            file.map(PathBuf::from)
        });
    f.finish(ctx);
    SmtpConfig {
        listen,
        hostname,
        backlog,
        max_connections,
        max_message_size,
        receive_memory,
        max_recipients,
        max_commands_before_mail,
        idle_timeout,
        relay_networks,
        accept_domains,
        tls,
        limits,
        auth,
    }
}
