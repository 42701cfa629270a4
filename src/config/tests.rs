//! Tests of `load`: one per kind of error, plus the shipped default file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

/// A valid `[node]` table: 3 lines.
const NODE: &str = "[node]\nname = \"n1\"\ndata_dir = \"./d\"\n";

/// The smallest valid file: 7 lines, so appended text starts on line 8.
const MIN: &str = "[node]
name = \"n1\"
data_dir = \"./d\"

[[route]]
domains = [\"*\"]
drop_dir = \"./out\"
";

fn errors(text: &str) -> Vec<ConfigError> {
    match load_str(text, "t.toml") {
        Ok(c) => panic!("expected errors, loaded {c:?}"),
        Err(e) => e.0,
    }
}

/// Exactly one error, checked for field, line and a piece of the message.
fn one(text: &str, field: &str, line: usize, msg: &str) -> ConfigError {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
    let e = errs.into_iter().next().unwrap();
    assert_eq!((e.field.as_str(), e.line), (field, line), "{e}");
    assert!(e.message.contains(msg), "{e}\nwanted: {msg}");
    assert_eq!(e.file, "t.toml");
    e
}

fn with(extra: &str) -> String {
    format!("{MIN}{extra}")
}

/// Root-level keys must come before any table header.
fn root(extra: &str) -> String {
    format!("{extra}{MIN}")
}

fn ok(text: &str) -> Config {
    load_str(text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn shipped_config_loads_with_expected_values() {
    let c = ok(include_str!("../../config/mtad.toml"));
    assert_eq!(c.node.name, "node-a");
    assert_eq!(c.node.data_dir, PathBuf::from("./var/node-a"));
    assert_eq!(
        c.smtp.listen,
        vec!["127.0.0.1:2525".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(c.smtp.hostname, "mx.example.test");
    let nets: Vec<String> = c
        .smtp
        .relay_networks
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["127.0.0.0/8", "::1/128"]);
    assert_eq!(c.smtp.accept_domains, ["example.test"]);
    assert_eq!(c.routes.len(), 1);
    assert_eq!(c.routes[0].domains, ["*"]);
    assert_eq!(
        c.routes[0].target,
        RouteTarget::DropDir("./var/outbox".into())
    );
    assert_eq!(c.route_for("example.test"), Some(0));
    assert_eq!(
        c.log,
        LogConfig {
            format: LogFormat::Json,
            level: "info".into()
        }
    );
    // Everything spelled out in the file equals the built-in defaults.
    let min = ok(MIN);
    assert_eq!(c.smtp.max_message_size, min.smtp.max_message_size);
    assert_eq!(c.delivery, min.delivery);
}

#[test]
fn minimal_file_gets_defaults() {
    let c = ok(MIN);
    assert_eq!(
        c.node,
        NodeConfig {
            name: "n1".into(),
            data_dir: "./d".into(),
            shutdown_grace: Duration::from_secs(30),
        }
    );
    let s = &c.smtp;
    assert_eq!(
        s.listen,
        vec!["127.0.0.1:2525".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(s.hostname, "localhost");
    assert_eq!((s.backlog, s.max_connections), (4096, 10_000));
    assert_eq!(s.max_message_size, 50 * 1024 * 1024);
    assert_eq!(s.receive_memory, 1 << 30);
    assert_eq!((s.max_recipients, s.max_commands_before_mail), (1000, 100));
    assert_eq!(s.idle_timeout, Duration::from_secs(300));
    let nets: Vec<String> = s.relay_networks.iter().map(|n| n.to_string()).collect();
    assert_eq!(nets, ["127.0.0.0/8", "::1/128"]);
    assert!(s.accept_domains.is_empty());
    let secs = Duration::from_secs;
    assert_eq!(
        c.delivery,
        DeliveryConfig {
            association_threshold: 50,
            max_associations: 20,
            max_messages_per_association: 1000,
            association_lifetime: secs(300),
            idle_timeout: secs(30),
            stall_timeout: secs(60),
            transaction_timeout: secs(600),
            connect_timeout: secs(30),
            retry: vec![secs(60), secs(300), secs(900), secs(3600), secs(4 * 3600)],
            max_queue_lifetime: secs(5 * 86400),
        }
    );
    assert_eq!(c.routes[0].tls, TlsPolicy::Opportunistic);
    assert_eq!(c.routes[0].source_address, None);
    assert_eq!(
        c.log,
        LogConfig {
            format: LogFormat::Json,
            level: "info".into()
        }
    );
}

#[test]
fn values_are_read_and_normalised() {
    let c = ok("[node]\nname = \"n\"\ndata_dir = \"d\"\n\
        [smtp]\nhostname = \"MX.Example.TEST.\"\nmax_message_size = 2048\n\
        relay_networks = [\"10.1.2.3/8\", \"192.0.2.7\", \"2001:db8::1\"]\n\
        accept_domains = [\"Example.TEST.\"]\n\
        [delivery]\nretry = [\"90s\"]\n\
        [[route]]\ndomains = [\"EXAMPLE.test\"]\nnext_hops = [\"127.0.0.1:2526\", \"[::1]:25\"]\n\
        source_address = \"198.18.0.100\"\ntls = \"required\"\n\
        [log]\nformat = \"text\"\nlevel = \"warn,mtad=debug\"\n");
    assert_eq!(c.smtp.hostname, "mx.example.test");
    assert_eq!(c.smtp.max_message_size, 2048);
    let nets: Vec<String> = c
        .smtp
        .relay_networks
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::1/128"]);
    assert_eq!(c.smtp.accept_domains, ["example.test"]);
    assert_eq!(c.delivery.retry, [Duration::from_secs(90)]);
    let r = &c.routes[0];
    assert_eq!(r.domains, ["example.test"]);
    let hops = vec![
        "127.0.0.1:2526".parse().unwrap(),
        "[::1]:25".parse().unwrap(),
    ];
    assert_eq!(r.target, RouteTarget::Smtp(hops));
    assert_eq!(r.source_address, Some("198.18.0.100".parse().unwrap()));
    assert_eq!(r.tls, TlsPolicy::Required);
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.log.level, "warn,mtad=debug");
}

#[test]
fn routes_may_be_inline_tables() {
    let c = ok("node = { name = \"n\", data_dir = \"d\" }\n\
        route = [{ domains = [\"*\"], drop_dir = \"o\" }]\n");
    assert_eq!(c.routes[0].target, RouteTarget::DropDir("o".into()));
}

#[test]
fn syntax_error_is_one_error_with_position() {
    let e = one(
        "[node]\nname = \"n\"\ndata_dir = [\"d\",\n",
        "",
        3,
        "TOML syntax error",
    );
    assert!(e.column >= 1);
    let e = one(
        "[node]\nname = \"n\"\nname = \"m\"\n",
        "",
        3,
        "duplicate key",
    );
    assert_eq!(e.column, 1);
}

#[test]
fn unknown_key_at_root() {
    let e = one(&root("bogus = 1\n"), "bogus", 1, "unknown key \"bogus\"");
    assert_eq!(e.column, 1);
    one(&with("[routes]\n"), "routes", 8, "did you mean \"route\"?");
}

#[test]
fn unknown_key_nested() {
    let e = one(
        &with("[smtp]\nlistn = []\n"),
        "smtp.listn",
        9,
        "unknown key \"listn\"",
    );
    assert!(e.message.contains("did you mean \"listen\"?"), "{e}");
    one(
        &with("[delivery]\nfoo = 1\n"),
        "delivery.foo",
        9,
        "unknown key \"foo\"",
    );
    // In a route, and in a dotted key under the root.
    one(
        &MIN.replace("drop_dir", "color = 1\ndrop_dir"),
        "route[0].color",
        7,
        "unknown key",
    );
    one(
        &root("log.colour = true\n"),
        "log.colour",
        1,
        "unknown key \"colour\"",
    );
}

#[test]
fn missing_required_points_at_table_header() {
    let e = one(
        "\n[node]\ndata_dir = \"d\"\n[[route]]\ndomains = [\"*\"]\ndrop_dir = \"o\"\n",
        "node.name",
        2,
        "missing required key \"name\"",
    );
    assert_eq!(e.column, 1);
    one(
        "[node]\nname = \"n\"\ndata_dir = \"d\"\n[[route]]\ndrop_dir = \"o\"\n",
        "route[0].domains",
        4,
        "missing required key \"domains\"",
    );
    one(
        "[[route]]\ndomains = [\"*\"]\ndrop_dir = \"o\"\n",
        "node",
        1,
        "missing required table [node]",
    );
    one(
        "[node]\nname = \"n\"\ndata_dir = \"d\"\n",
        "route",
        1,
        "at least one [[route]]",
    );
    one(
        &format!("route = []\n{NODE}"),
        "route",
        1,
        "at least one [[route]]",
    );
}

#[test]
fn wrong_type_string() {
    let e = one(
        &MIN.replace("\"n1\"", "5"),
        "node.name",
        2,
        "found integer 5",
    );
    assert!(e.message.starts_with("expected a node name"), "{e}");
    assert_eq!(e.column, 8);
    one(
        &MIN.replace("\"n1\"", "\"a b\""),
        "node.name",
        2,
        "found string \"a b\"",
    );
    one(
        &MIN.replace("\"n1\"", "\"\""),
        "node.name",
        2,
        "found string \"\"",
    );
    one(
        &MIN.replace("\"./out\"", "false"),
        "route[0].drop_dir",
        7,
        "expected a directory path",
    );
    one(
        &with("[smtp]\nhostname = \"-bad-.test\"\n"),
        "smtp.hostname",
        9,
        "expected a domain name",
    );
    one(
        &with("[smtp]\nhostname = \"10.0.0.1\"\n"),
        "smtp.hostname",
        9,
        "expected a domain name",
    );
}

#[test]
fn wrong_type_integer() {
    one(
        &with("[smtp]\nbacklog = \"big\"\n"),
        "smtp.backlog",
        9,
        "expected an integer from 1 to 65535, found string \"big\"",
    );
    one(
        &with("[delivery]\nmax_associations = 2.5\n"),
        "delivery.max_associations",
        9,
        "expected an integer >= 1, found float 2.5",
    );
}

#[test]
fn wrong_type_list() {
    one(
        &with("[smtp]\nlisten = \"127.0.0.1:25\"\n"),
        "smtp.listen",
        9,
        "expected a non-empty list of socket addresses like [\"127.0.0.1:2525\"], found string",
    );
    one(
        &with("[smtp]\nrelay_networks = \"127.0.0.0/8\"\n"),
        "smtp.relay_networks",
        9,
        "expected a list of networks",
    );
    one(
        &with("[smtp]\nlisten = []\n"),
        "smtp.listen",
        9,
        "found an empty list",
    );
    one(
        &with("[delivery]\nretry = []\n"),
        "delivery.retry",
        9,
        "found an empty list",
    );
    one(
        &MIN.replace("[\"*\"]", "[]"),
        "route[0].domains",
        6,
        "found an empty list",
    );
}

#[test]
fn wrong_type_duration() {
    one(
        &with("[delivery]\nidle_timeout = 30\n"),
        "delivery.idle_timeout",
        9,
        "expected a duration like \"30s\", found integer 30",
    );
    one(
        &with("[delivery]\nstall_timeout = \"5 parsecs\"\n"),
        "delivery.stall_timeout",
        9,
        "found string \"5 parsecs\"",
    );
    one(
        &with("[delivery]\nretry = [\"1m\", \"5m\", \"soon\"]\n"),
        "delivery.retry[2]",
        9,
        "expected a duration like \"30s\", found string \"soon\"",
    );
    one(
        &with("[smtp]\nidle_timeout = \"0s\"\n"),
        "smtp.idle_timeout",
        9,
        "expected a duration greater than zero",
    );
}

#[test]
fn wrong_type_size() {
    one(
        &with("[smtp]\nmax_message_size = \"lots\"\n"),
        "smtp.max_message_size",
        9,
        "expected a size like \"50MiB\" or a number of bytes, found string \"lots\"",
    );
    one(
        &with("[smtp]\nmax_message_size = true\n"),
        "smtp.max_message_size",
        9,
        "found boolean true",
    );
    one(
        &with("[smtp]\nmax_message_size = -5\n"),
        "smtp.max_message_size",
        9,
        "found integer -5",
    );
}

#[test]
fn receive_memory_must_hold_one_message_of_the_largest_size() {
    one(
        &with("[smtp]\nmax_message_size = \"10MiB\"\nreceive_memory = \"5MiB\"\n"),
        "smtp.receive_memory",
        10,
        "must be at least max_message_size (10485760 bytes)",
    );
    let c = load_str(&with("[smtp]\nmax_message_size = \"1GiB\"\n"), "t.toml").unwrap();
    assert_eq!(
        c.smtp.receive_memory,
        2 << 30,
        "default: two of the largest"
    );
}

#[test]
fn wrong_type_socket_address() {
    let e = one(
        &with("[smtp]\nlisten = [\"127.0.0.1:25\", \"localhost:25\"]\n"),
        "smtp.listen[1]",
        9,
        "expected a socket address like \"127.0.0.1:2525\"",
    );
    assert_eq!(e.column, 27);
    one(
        &MIN.replace("drop_dir = \"./out\"", "next_hops = [\"127.0.0.1:0\"]"),
        "route[0].next_hops[0]",
        7,
        "non-zero port",
    );
    one(
        &MIN.replace("drop_dir = \"./out\"", "next_hops = [2526]"),
        "route[0].next_hops[0]",
        7,
        "found integer 2526",
    );
}

#[test]
fn wrong_type_cidr() {
    one(
        &with("[smtp]\nrelay_networks = [\"10.0.0.0/33\"]\n"),
        "smtp.relay_networks[0]",
        9,
        "expected a network like \"127.0.0.0/8\" or an IP address, found string \"10.0.0.0/33\"",
    );
}

#[test]
fn wrong_type_ip() {
    let text = MIN.replace(
        "drop_dir = \"./out\"",
        "next_hops = [\"127.0.0.1:2526\"]\nsource_address = \"my-vip\"",
    );
    one(
        &text,
        "route[0].source_address",
        8,
        "expected an IP address like \"198.18.0.100\", found string \"my-vip\"",
    );
}

#[test]
fn wrong_type_enum() {
    let text = MIN.replace(
        "drop_dir = \"./out\"",
        "next_hops = [\"127.0.0.1:2526\"]\ntls = \"yes\"",
    );
    one(
        &text,
        "route[0].tls",
        8,
        "expected one of \"none\", \"opportunistic\", \"required\", found string \"yes\"",
    );
    one(
        &with("[log]\nformat = \"xml\"\n"),
        "log.format",
        9,
        "expected one of \"json\", \"text\", found string \"xml\"",
    );
}

#[test]
fn wrong_type_table() {
    one(
        &root("smtp = 1\n"),
        "smtp",
        1,
        "expected a table, found integer 1",
    );
    one(
        &with("[route]\n").replace("[[route]]\ndomains = [\"*\"]\ndrop_dir = \"./out\"\n", ""),
        "route",
        5,
        "expected an array of tables [[route]], found a table",
    );
}

#[test]
fn out_of_range() {
    one(
        &with("[smtp]\nbacklog = 0\n"),
        "smtp.backlog",
        9,
        "expected an integer from 1 to 65535, found integer 0",
    );
    one(
        &with("[smtp]\nbacklog = 70000\n"),
        "smtp.backlog",
        9,
        "found integer 70000",
    );
    one(
        &with("[smtp]\nmax_connections = 0\n"),
        "smtp.max_connections",
        9,
        "expected an integer >= 1",
    );
    one(
        &with("[smtp]\nmax_message_size = \"512B\"\n"),
        "smtp.max_message_size",
        9,
        "expected a size of at least 1KiB, found string \"512B\" (512 bytes)",
    );
    one(
        &with("[delivery]\nretry = [\"1m\", \"0s\"]\n"),
        "delivery.retry[1]",
        9,
        "greater than zero",
    );
}

#[test]
fn route_needs_exactly_one_target() {
    let both = MIN.replace("drop_dir", "next_hops = [\"127.0.0.1:2526\"]\ndrop_dir");
    one(
        &both,
        "route[0]",
        8,
        "one of next_hops, drop_dir or mx, not next_hops and drop_dir",
    );
    let neither = MIN.replace("drop_dir = \"./out\"\n", "");
    let e = one(
        &neither,
        "route[0]",
        5,
        "needs next_hops (SMTP next hops) or drop_dir",
    );
    assert_eq!(e.column, 1);
    let text = MIN.replace(
        "drop_dir = \"./out\"",
        "drop_dir = \"o\"\nsource_address = \"192.0.2.1\"",
    );
    one(
        &text,
        "route[0].source_address",
        8,
        "only applies to next_hops",
    );
    let text = MIN.replace("drop_dir = \"./out\"", "drop_dir = \"o\"\ntls = \"none\"");
    one(&text, "route[0].tls", 8, "tls only applies to next_hops");
}

#[test]
fn route_after_catch_all_is_unreachable() {
    let e = one(
        &with("\n[[route]]\ndomains = [\"late.example\"]\ndrop_dir = \"x\"\n"),
        "route[1]",
        9,
        "unreachable: route[0] matches every domain",
    );
    assert_eq!(e.column, 1);
    // A domain an earlier route already serves is just as dead.
    let text = format!(
        "{}[[route]]\ndomains = [\"a.test\"]\ndrop_dir = \"x\"\n[[route]]\ndomains = [\"b.test\", \"A.test\"]\ndrop_dir = \"y\"\n[[route]]\ndomains = [\"*\"]\ndrop_dir = \"z\"\n",
        NODE
    );
    one(
        &text,
        "route[1].domains[1]",
        8,
        "unreachable: \"a.test\" is already served by route[0]",
    );
}

#[test]
fn star_in_accept_domains_is_an_open_relay() {
    let e = one(
        &with("[smtp]\naccept_domains = [\"example.test\", \"*\"]\n"),
        "smtp.accept_domains[1]",
        9,
        "open relay",
    );
    assert!(e.message.starts_with("\"*\" is not allowed here"), "{e}");
}

#[test]
fn accept_domain_without_a_route() {
    let text = MIN.replace("\"*\"", "\"example.test\"")
        + "[smtp]\naccept_domains = [\"example.test\", \"other.test\"]\n";
    one(
        &text,
        "smtp.accept_domains[1]",
        9,
        "no [[route]] serves \"other.test\"",
    );
}

#[test]
fn invalid_log_level() {
    one(
        &with("[log]\nlevel = \"mtad=loud\"\n"),
        "log.level",
        9,
        "invalid log filter \"mtad=loud\"",
    );
    one(
        &with("[log]\nlevel = \"verbose\"\n"),
        "log.level",
        9,
        "\"verbose\" is not a level",
    );
    ok(&with("[log]\nlevel = \"debug,mtad::smtp=trace\"\n"));
}

#[test]
fn smtp_tls_names_its_certificate_and_key() {
    let c = ok(&with(
        "[smtp.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nrequire_tls = true\n",
    ));
    let t = c.smtp.tls.unwrap();
    assert_eq!((t.cert, t.key), ("c.pem".into(), "k.pem".into()));
    assert!(t.require_tls);
    let errs = errors(&with("[smtp.tls]\ncert = 1\nrequire_tls = \"yes\"\n"));
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["smtp.tls.key", "smtp.tls.cert", "smtp.tls.require_tls"]
    );
}

#[test]
fn every_error_is_reported_with_line_and_field() {
    let text = r#"
[node]
name = "node a"
data_dir = "./var"

[smtp]
listen = ["127.0.0.1:2525", "nowhere"]
backlog = 0
lsten = 1

[delivery]
retry = ["1m", "5m", 15]
stall_timeout = 60

[[route]]
domains = ["*"]
drop_dir = "./out"

[[route]]
domains = ["dest.example"]

[log]
level = "mtad=loud"

[cluster]
name = "prod"
"#;
    let errs = errors(text);
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(
        got,
        [
            (3, "node.name"),
            (7, "smtp.listen[1]"),
            (8, "smtp.backlog"),
            (9, "smtp.lsten"),
            (12, "delivery.retry[2]"),
            (13, "delivery.stall_timeout"),
            (19, "route[1]"),
            (19, "route[1]"),
            (23, "log.level"),
            (25, "cluster.listen"),
            (25, "cluster.secret_file"),
        ],
        "{}",
        ConfigErrors(errs.clone())
    );
    assert!(errs[6].message.contains("unreachable") || errs[7].message.contains("unreachable"));
    assert!(
        errs[6].message.contains("needs next_hops") || errs[7].message.contains("needs next_hops")
    );

    // Display: one line per error, FILE:LINE:COL: FIELD: MESSAGE.
    let shown = ConfigErrors(errs).to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 11);
    assert_eq!(
        lines[4],
        "t.toml:12:22: delivery.retry[2]: expected a duration like \"30s\", found integer 15"
    );
}

#[test]
fn load_file_reads_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mtad.toml");
    std::fs::write(&path, MIN).unwrap();
    assert_eq!(load_file(&path).unwrap(), ok(MIN));

    std::fs::write(&path, root("bogus = 1\n")).unwrap();
    let e = load_file(&path).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}:1:1: bogus: ", path.display())),
        "{e}"
    );

    let missing = dir.path().join("nope.toml");
    let e = load_file(&missing).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].line, 0);
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read", missing.display())),
        "{e}"
    );
}

#[test]
fn an_admin_address_off_loopback_needs_a_token() {
    let base =
        "[node]\nname = \"n\"\ndata_dir = \"d\"\n[[route]]\ndomains = [\"*\"]\ndrop_dir = \"o\"\n";
    let open = format!("{base}[admin]\nlisten = \"0.0.0.0:8025\"\n");
    let e = load_str(&open, "t.toml").unwrap_err().0;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        (e[0].line, e[0].field.as_str()),
        (8, "admin.listen"),
        "{e:?}"
    );
    assert!(e[0].message.contains("token_file"), "{e:?}");
    let guarded = format!("{open}token_file = \"/etc/mtad/admin.token\"\n");
    let c = load_str(&guarded, "t.toml").unwrap();
    assert!(c.admin.unwrap().token_file.is_some());
}

#[test]
fn file_problems_are_reported_at_their_fields() {
    let text = "[node]\nname = \"a\"\n\n[smtp.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n\n\
                [cluster]\naccept_secret_files = [\n  \"one.key\",\n  \"two.key\",\n]\n";
    let problem = |field: &str| FileProblem {
        field: field.into(),
        message: "unusable".into(),
    };
    let errors = file_errors(
        text,
        "t.toml",
        &[
            problem("smtp.tls"),
            problem("cluster.accept_secret_files[1]"),
            problem("cluster.nowhere"),
        ],
    );
    let at: Vec<(usize, usize)> = errors.0.iter().map(|e| (e.line, e.column)).collect();
    // In file order; one without a place first, as whole-file errors are.
    assert_eq!(at, [(0, 0), (4, 1), (11, 3)]);
    assert_eq!(
        errors.0[2].to_string(),
        "t.toml:11:3: cluster.accept_secret_files[1]: unusable"
    );
}

#[test]
fn spool_size_is_a_share_of_the_filesystem_or_bytes() {
    assert_eq!(ok(MIN).spool.max_size, SpoolSize::Percent(80));
    let c = ok(&with("[spool]\nmax_size = \"50%\"\n"));
    assert_eq!(c.spool.max_size, SpoolSize::Percent(50));
    let c = ok(&with("[spool]\nmax_size = \"10GiB\"\n"));
    assert_eq!(c.spool.max_size, SpoolSize::Bytes(10 << 30));
    for bad in ["\"0%\"", "\"120%\"", "\"lots\"", "100"] {
        let e = one(
            &with(&format!("[spool]\nmax_size = {bad}\n")),
            "spool.max_size",
            9,
            "expected",
        );
        assert!(e.to_string().contains("t.toml:9"), "{e}");
    }
}

#[test]
fn mx_routes_and_the_dns_table_are_read() {
    let c = ok("[node]\nname = \"n\"\ndata_dir = \"d\"\n\
        [[route]]\ndomains = [\"*\"]\nmx = true\nmx_port = 2525\n\
        [dns]\nservers = [\"127.0.0.1:5353\"]\nprefer = \"ipv4\"\nmax_mx_hosts = 3\ntimeout = \"2s\"\n");
    assert_eq!(c.routes[0].target, RouteTarget::Mx { port: 2525 });
    assert_eq!(c.dns.servers, ["127.0.0.1:5353".parse().unwrap()]);
    assert_eq!(c.dns.prefer, crate::config::IpPreference::Ipv4);
    assert_eq!(
        (c.dns.max_mx_hosts, c.dns.timeout),
        (3, Duration::from_secs(2))
    );
    // Defaults: the system's resolver, port 25, IPv6 first.
    let c = ok("[node]\nname = \"n\"\ndata_dir = \"d\"\n[[route]]\ndomains = [\"*\"]\nmx = true\n");
    assert_eq!(c.routes[0].target, RouteTarget::Mx { port: 25 });
    assert_eq!(c.dns, crate::config::DnsConfig::default());
}

#[test]
fn mx_route_mistakes_are_named() {
    let base = "[node]\nname = \"n\"\ndata_dir = \"d\"\n[[route]]\ndomains = [\"*\"]\n";
    one(
        &format!("{base}mx = true\nnext_hops = [\"127.0.0.1:25\"]\n"),
        "route[0]",
        6,
        "not next_hops and mx",
    );
    one(
        &format!("{base}drop_dir = \"o\"\nmx_port = 2525\n"),
        "route[0].mx_port",
        7,
        "mx_port only applies to mx = true",
    );
    one(
        &format!("{base}mx = true\ntls = \"required\"\n"),
        "route[0].tls",
        7,
        "not supported with mx = true yet",
    );
    one(
        &format!("{base}mx = true\n[dns]\nprefer = \"ipv5\"\n"),
        "dns.prefer",
        8,
        "",
    );
}
