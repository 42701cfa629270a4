//! Loading: TOML text → [`Config`], reporting every error at once.
//!
//! serde stops at the first problem, which makes fixing a config a slow
//! loop of edit-and-retry; so the file is parsed into a spanned `toml_edit`
//! document and read by hand with [`reader`](super::reader), which keeps
//! going after each error and records its line, column and field path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::error::{position, ConfigError, ConfigErrors};
use super::reader::{domain, duration_or, int_or, Ctx, Fields};
use super::smtp::{read_smtp, Placed};
use super::{
    Config, DeliveryConfig, LogConfig, LogFormat, NodeConfig, Route, RouteTarget, TlsPolicy,
};

/// Reads and loads the configuration file at `path`.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(&text, &file),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file,
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read the configuration file: {e}"),
        }])),
    }
}

/// Loads a configuration from `text`; `file` is only used in messages.
pub fn load_str(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let (line, column) = e.span().map_or((1, 1), |s| position(text, s.start));
            return Err(ConfigErrors(vec![ConfigError {
                file: file.to_string(),
                line,
                column,
                field: String::new(),
                message: format!("TOML syntax error: {}", e.message()),
            }]));
        }
    };
    let mut ctx = Ctx::new(text, file);
    let config = read_config(&mut ctx, Fields::root(doc.as_table()));
    if ctx.errors.is_empty() {
        Ok(config)
    } else {
        // Cross-field checks run last; sorting puts every error in file order.
        let mut errors = ctx.errors;
        errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(errors))
    }
}

fn read_config(ctx: &mut Ctx<'_>, mut root: Fields<'_>) -> Config {
    let node = match root.take("node") {
        Some(n) => ctx.table(&n).map(|f| read_node(ctx, f)),
        None => {
            ctx.error(&None, "node", "missing required table [node]");
            None
        }
    };
    let node = node.unwrap_or_else(|| NodeConfig {
        name: String::new(),
        data_dir: PathBuf::new(),
        shutdown_grace: Duration::from_secs(30),
    });

    let cluster = root
        .take("cluster")
        .and_then(|n| ctx.table(&n))
        .map(|f| super::cluster::read_cluster(ctx, f));
    let groups = super::group::read_groups(ctx, &mut root, cluster.is_some());
    let mut accept = Vec::new();
    let smtp = optional(ctx, &mut root, "smtp");
    let smtp = read_smtp(ctx, smtp, &mut accept, &groups);
    let delivery = optional(ctx, &mut root, "delivery");
    let delivery = read_delivery(ctx, delivery);
    let spool = optional(ctx, &mut root, "spool");
    let spool = super::spool::read_spool(ctx, spool, cluster.is_some());
    // A witness only votes: it relays nothing, so it needs no route.
    let witness = cluster
        .as_ref()
        .is_some_and(|c| c.role == super::ClusterRole::Witness);
    let routes = read_routes(ctx, &mut root, !witness);
    check_accept_domains_routed(ctx, &accept, &routes);
    let log = optional(ctx, &mut root, "log");
    let log = read_log(ctx, log);
    let admin = root
        .take("admin")
        .and_then(|n| ctx.table(&n))
        .map(|f| read_admin(ctx, f));
    let dns = optional(ctx, &mut root, "dns");
    let dns = read_dns(ctx, dns);
    root.finish(ctx);

    Config {
        node,
        smtp,
        delivery,
        spool,
        routes,
        log,
        cluster,
        admin,
        groups,
        dns,
    }
}

fn read_dns(ctx: &mut Ctx<'_>, mut f: Fields<'_>) -> super::DnsConfig {
    let mut dns = super::DnsConfig::default();
    if let Some(n) = f.take("servers") {
        let what = "a list of name servers like [\"127.0.0.1:53\"]";
        let servers = ctx.list(&n, what, false, |ctx, e| ctx.socket_addr(e, false));
        dns.servers = servers.unwrap_or_default();
    }
    if let Some(n) = f.take("prefer") {
        let options = [
            ("ipv6", super::IpPreference::Ipv6),
            ("ipv4", super::IpPreference::Ipv4),
        ];
        if let Some(p) = ctx.choice(&n, &options) {
            dns.prefer = p;
        }
    }
    dns.max_mx_hosts = int_or(ctx, &mut f, "max_mx_hosts", 1, 20, 5) as usize;
    dns.timeout = duration_or(ctx, &mut f, "timeout", 5);
    f.finish(ctx);
    dns
}

fn read_admin(ctx: &mut Ctx<'_>, mut f: Fields<'_>) -> super::AdminConfig {
    let node = f.take("listen");
    let listen = node
        .as_ref()
        .and_then(|n| ctx.socket_addr(n, true))
        .unwrap_or_else(|| ([127, 0, 0, 1], 8025).into());
    let token_file = f
        .take("token_file")
        .and_then(|n| ctx.string(&n, "a file path like \"/etc/mtad/admin.token\""))
        .map(PathBuf::from);
    // Anyone who reaches the API can move groups and delete mail: off
    // the machine, only with the token.
    if let Some(n) = node.filter(|_| !listen.ip().is_loopback() && token_file.is_none()) {
        let msg = "an admin address off loopback needs a token: set admin.token_file";
        ctx.error(&n.span, &n.path, msg);
    }
    f.finish(ctx);
    super::AdminConfig { listen, token_file }
}

/// An optional table: absent reads as all defaults.
fn optional<'d>(ctx: &mut Ctx<'_>, parent: &mut Fields<'d>, key: &'static str) -> Fields<'d> {
    let path = parent.child_path(key);
    parent
        .take(key)
        .and_then(|n| ctx.table(&n))
        .unwrap_or_else(|| Fields::absent(&path))
}

fn read_node(ctx: &mut Ctx<'_>, mut f: Fields<'_>) -> NodeConfig {
    let name = f
        .require(ctx, "name")
        .and_then(|n| {
            let what = "a node name of letters, digits, '.', '_' or '-' like \"node-a\"";
            let s = ctx.string(&n, what)?;
            let ok = s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                ctx.mismatch(&n, what);
            }
            Some(s)
        })
        .unwrap_or_default();
    let data_dir = f
        .require(ctx, "data_dir")
        .and_then(|n| ctx.string(&n, "a directory path like \"./var/node-a\""))
        .unwrap_or_default();
    let shutdown_grace = duration_or(ctx, &mut f, "shutdown_grace", 30);
    f.finish(ctx);
    NodeConfig {
        name,
        data_dir: data_dir.into(),
        shutdown_grace,
    }
}

fn read_delivery(ctx: &mut Ctx<'_>, mut f: Fields<'_>) -> DeliveryConfig {
    let association_threshold = int_or(ctx, &mut f, "association_threshold", 1, i64::MAX, 50);
    let max_associations = int_or(ctx, &mut f, "max_associations", 1, i64::MAX, 20);
    let max_messages = int_or(
        ctx,
        &mut f,
        "max_messages_per_association",
        1,
        i64::MAX,
        1000,
    );
    let association_lifetime = duration_or(ctx, &mut f, "association_lifetime", 300);
    let idle_timeout = duration_or(ctx, &mut f, "idle_timeout", 30);
    let stall_timeout = duration_or(ctx, &mut f, "stall_timeout", 60);
    let transaction_timeout = duration_or(ctx, &mut f, "transaction_timeout", 600);
    let connect_timeout = duration_or(ctx, &mut f, "connect_timeout", 30);
    let retry = f
        .take("retry")
        .and_then(|n| {
            let what = "a non-empty list of durations like [\"1m\", \"5m\"]";
            ctx.list(&n, what, true, |ctx, e| ctx.duration(e))
        })
        .unwrap_or_else(|| {
            [60, 300, 900, 3600, 4 * 3600]
                .map(Duration::from_secs)
                .to_vec()
        });
    let max_queue_lifetime = duration_or(ctx, &mut f, "max_queue_lifetime", 5 * 86400);
    f.finish(ctx);
    DeliveryConfig {
        association_threshold: association_threshold as usize,
        max_associations: max_associations as usize,
        max_messages_per_association: max_messages as u64,
        association_lifetime,
        idle_timeout,
        stall_timeout,
        transaction_timeout,
        connect_timeout,
        retry,
        max_queue_lifetime,
    }
}

/// What earlier routes already serve, to find routes that can never match.
#[derive(Default)]
struct Served {
    catch_all: Option<usize>,
    domains: HashMap<String, usize>,
}

fn read_routes(ctx: &mut Ctx<'_>, root: &mut Fields<'_>, required: bool) -> Vec<Arc<Route>> {
    let Some(n) = root.take("route") else {
        if !required {
            return Vec::new();
        }
        let msg = "at least one [[route]] is required; \
                   a catch-all route has domains = [\"*\"]";
        ctx.error(&None, "route", msg);
        return Vec::new();
    };
    let Some(tables) = ctx.tables(&n, "an array of tables [[route]]") else {
        return Vec::new();
    };
    if tables.is_empty() {
        ctx.error(&n.span, &n.path, "at least one [[route]] is required");
    }
    let mut served = Served::default();
    tables
        .into_iter()
        .enumerate()
        .map(|(i, f)| Arc::new(read_route(ctx, f, i, &mut served)))
        .collect()
}

fn read_route(ctx: &mut Ctx<'_>, mut f: Fields<'_>, index: usize, served: &mut Served) -> Route {
    if let Some(j) = served.catch_all {
        let msg = format!("unreachable: route[{j}] matches every domain");
        ctx.error(&f.span, &f.path, msg);
    }
    let domains = f
        .require(ctx, "domains")
        .and_then(|n| {
            let what = "a non-empty list of domains like [\"dest.example\"] or [\"*\"]";
            ctx.list(&n, what, true, |ctx, e| {
                let d = if e.item.value().and_then(|v| v.as_str()) == Some("*") {
                    "*".to_string()
                } else {
                    domain(ctx, e, "a domain name like \"dest.example\" or \"*\"")?
                };
                if d == "*" {
                    served.catch_all.get_or_insert(index);
                } else if let Some(j) = served.domains.get(&d).filter(|j| **j != index) {
                    // Only when no catch-all came first: that error already covers it.
                    if !matches!(served.catch_all, Some(c) if c != index) {
                        let msg = format!("unreachable: \"{d}\" is already served by route[{j}]");
                        ctx.error(&e.span, &e.path, msg);
                    }
                } else {
                    served.domains.insert(d.clone(), index);
                }
                Some(d)
            })
        })
        .unwrap_or_default();

    let next_hops = f.take("next_hops");
    let drop_dir = f.take("drop_dir");
    let mx = f.take("mx");
    let mx_port = f.take("mx_port");
    let given: Vec<(&str, _)> = [
        ("next_hops", &next_hops),
        ("drop_dir", &drop_dir),
        ("mx", &mx),
    ]
    .into_iter()
    .filter_map(|(k, n)| Some((k, n.as_ref()?.span.clone())))
    .collect();
    if let [(a, _), (b, span), ..] = given.as_slice() {
        let msg = format!("a route has one of next_hops, drop_dir or mx, not {a} and {b}");
        ctx.error(span, &f.path, msg);
    }
    let target = if let Some(hops) = next_hops {
        let what = "a non-empty list of socket addresses like [\"127.0.0.1:2526\"]";
        let hops = ctx.list(&hops, what, true, |ctx, e| ctx.socket_addr(e, false));
        RouteTarget::Smtp(hops.unwrap_or_default())
    } else if let Some(drop) = drop_dir {
        let dir = ctx.string(&drop, "a directory path like \"./var/outbox\"");
        RouteTarget::DropDir(dir.unwrap_or_default().into())
    } else if let Some(n) = mx {
        if ctx.boolean(&n) == Some(false) {
            ctx.error(&n.span, &n.path, "mx = false means nothing: leave it out");
        }
        RouteTarget::Mx { port: 25 }
    } else {
        let msg = "a route needs next_hops (SMTP next hops) or drop_dir (a local directory), \
                   or mx = true (the recipient domain's MX hosts)";
        ctx.error(&f.span, &f.path, msg);
        RouteTarget::DropDir(PathBuf::new())
    };
    let target = match (target, mx_port) {
        (RouteTarget::Mx { .. }, Some(n)) => RouteTarget::Mx {
            port: ctx.int(&n, 1, 65535).map_or(25, |p| p as u16),
        },
        (t, Some(n)) => {
            ctx.error(&n.span, &n.path, "mx_port only applies to mx = true");
            t
        }
        (t, None) => t,
    };
    let is_smtp = matches!(target, RouteTarget::Smtp(_) | RouteTarget::Mx { .. });
    let is_mx = matches!(target, RouteTarget::Mx { .. });

    // source_address and tls only mean something for SMTP next hops; set on
    // a drop_dir route they would be silently ignored, so say so instead.
    let source_address = f.take("source_address").and_then(|n| {
        let ip = ctx.ip(&n)?;
        if !is_smtp {
            ctx.error(&n.span, &n.path, "source_address only applies to next_hops");
        }
        Some(ip)
    });
    let tls = f
        .take("tls")
        .and_then(|n| {
            let options = [
                ("none", TlsPolicy::None),
                ("opportunistic", TlsPolicy::Opportunistic),
                ("required", TlsPolicy::Required),
            ];
            let tls = ctx.choice(&n, &options)?;
            if !is_smtp {
                ctx.error(&n.span, &n.path, "tls only applies to next_hops");
            }
            // Which name an MX host's certificate must carry is the
            // receiving domain's policy (MTA-STS, DANE): not built yet.
            if is_mx && tls == TlsPolicy::Required {
                let msg = "tls = \"required\" is not supported with mx = true yet";
                ctx.error(&n.span, &n.path, msg);
            }
            Some(tls)
        })
        .unwrap_or(TlsPolicy::Opportunistic);
    let mut smtp_only = |ctx: &mut Ctx<'_>, key: &'static str, what: &str| {
        let n = f.take(key)?;
        if !is_smtp {
            ctx.error(&n.span, &n.path, format!("{key} only applies to next_hops"));
        }
        ctx.string(&n, what)
    };
    let tls_ca = smtp_only(
        ctx,
        "tls_ca",
        "a file path like \"/etc/mtad/next-hop-ca.pem\"",
    )
    .map(PathBuf::from);
    let tls_name = smtp_only(ctx, "tls_name", "a host name like \"smtp.example.net\"");
    f.finish(ctx);
    Route {
        domains,
        target,
        source_address,
        tls,
        tls_ca,
        tls_name,
    }
}

/// Mail accepted for a domain that no route serves could never leave.
fn check_accept_domains_routed(ctx: &mut Ctx<'_>, accept: &[Placed], routes: &[Arc<Route>]) {
    if routes.is_empty() {
        return; // "at least one route" already said it
    }
    for a in accept {
        if !routes.iter().any(|r| r.matches(&a.domain)) {
            let msg = format!(
                "no [[route]] serves \"{}\"; mail accepted for it could never be delivered",
                a.domain
            );
            ctx.error(&a.span, &a.path, msg);
        }
    }
}

fn read_log(ctx: &mut Ctx<'_>, mut f: Fields<'_>) -> LogConfig {
    let format = f
        .take("format")
        .and_then(|n| ctx.choice(&n, &[("json", LogFormat::Json), ("text", LogFormat::Text)]))
        .unwrap_or(LogFormat::Json);
    let level = f
        .take("level")
        .and_then(|n| {
            let s = ctx.string(&n, "a log filter like \"info\" or \"info,mtad=debug\"")?;
            if let Err(why) = check_log_filter(&s) {
                ctx.error(&n.span, &n.path, why);
            }
            Some(s)
        })
        .unwrap_or_else(|| "info".to_string());
    f.finish(ctx);
    LogConfig { format, level }
}

/// EnvFilter accepts a bare word as a target name (so "verbose" would
/// silently mean "trace for target verbose", i.e. no logs); insist that a
/// directive without '=' is a level.
fn check_log_filter(s: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    tracing_subscriber::EnvFilter::try_new(s)
        .map_err(|e| format!("invalid log filter \"{s}\": {e}"))?;
    for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains(['=', '['])
            && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            return Err(format!(
                "invalid log filter \"{s}\": \"{directive}\" is not a level \
                 (off, error, warn, info, debug, trace); write target=level for a target"
            ));
        }
    }
    Ok(())
}
