use std::time::Duration;

use crate::config::{load_str, ConfigErrors, VipProvider};

/// 10 lines: node, a route and a cluster; a group starts on line 11.
const BASE: &str = "[node]\nname = \"a\"\ndata_dir = \"d\"\n\
                    [[route]]\ndomains = [\"*\"]\ndrop_dir = \"o\"\n\
                    [cluster]\nname = \"c\"\nlisten = \"127.0.0.1:7400\"\nsecret_file = \"k\"\n";

fn errors(groups: &str) -> Vec<(String, usize, String)> {
    match load_str(&format!("{BASE}{groups}"), "g.toml") {
        Ok(_) => Vec::new(),
        Err(ConfigErrors(e)) => e
            .iter()
            .map(|e| (e.field.clone(), e.line, e.message.clone()))
            .collect(),
    }
}

#[test]
fn a_group_with_defaults() {
    let text = format!(
        "{BASE}[[group]]\nname = \"mta\"\nvip = \"198.18.0.100/24\"\ninterface = \"eth0\"\n"
    );
    let c = load_str(&text, "g.toml").unwrap_or_else(|e| panic!("{e}"));
    let g = &c.groups[0];
    assert_eq!(g.name, "mta");
    assert_eq!(g.vip.unwrap().to_string(), "198.18.0.100/24");
    assert_eq!(g.provider, VipProvider::Netlink);
    assert_eq!(g.interface.as_deref(), Some("eth0"));
    assert_eq!(g.smtp_port, 25);
    assert!(!g.failback);
    assert_eq!(g.lease, Duration::from_millis(600));
    assert_eq!(g.max_restarts, 3);
    assert!(g.preferred_nodes.is_empty());
    assert!(c.smtp.listen.is_empty(), "SMTP is served on the VIP");
}

#[test]
fn a_loopback_group_with_everything_set() {
    let text = format!(
        "{BASE}[[group]]\nname = \"mta\"\nvip = \"127.0.0.100\"\nprovider = \"loopback\"\n\
         preferred_nodes = [\"b\", \"a\"]\nsmtp_port = 2525\nfailback = true\nlease = \"2s\"\n\
         start_timeout = \"3s\"\nstop_timeout = \"1s\"\ncheck_interval = \"500ms\"\n\
         check_timeout = \"200ms\"\nmax_restarts = 5\nrestart_window = \"1m\"\n\
         announce_interval = \"30s\"\ndrain_timeout = \"5s\"\n"
    );
    let c = load_str(&text, "g.toml").unwrap_or_else(|e| panic!("{e}"));
    let g = &c.groups[0];
    assert_eq!(g.vip.unwrap().to_string(), "127.0.0.100/32");
    assert_eq!(g.provider, VipProvider::Loopback);
    assert_eq!(g.preferred_nodes, ["b", "a"]);
    assert_eq!((g.smtp_port, g.failback), (2525, true));
    assert_eq!(g.lease, Duration::from_secs(2));
    assert_eq!(g.check_timeout, Duration::from_millis(200));
    assert_eq!(g.max_restarts, 5);
    assert_eq!(g.drain_timeout, Duration::from_secs(5));
}

#[test]
fn every_group_error_is_reported_with_its_line() {
    let errs = errors(
        "[[group]]\nname = \"bad name\"\nvip = \"not an ip\"\nprovider = \"carp\"\n\
         smtp_port = 0\nlease = \"10ms\"\ncheck_interval = \"1s\"\ncheck_timeout = \"2s\"\n",
    );
    let fields: Vec<&str> = errs.iter().map(|(f, _, _)| f.as_str()).collect();
    for want in [
        "group[0].name",
        "group[0].vip",
        "group[0].provider",
        "group[0].smtp_port",
        "group[0].lease",
        "group[0].check_timeout",
    ] {
        assert!(fields.contains(&want), "{want} missing from {errs:?}");
    }
    let name = errs.iter().find(|(f, _, _)| f == "group[0].name").unwrap();
    assert_eq!(name.1, 12);
}

#[test]
fn netlink_needs_an_interface_and_loopback_takes_none() {
    let errs = errors("[[group]]\nname = \"g\"\nvip = \"198.18.0.1/24\"\n");
    assert!(
        errs.iter()
            .any(|(f, _, m)| f == "group[0].interface" && m.contains("netlink")),
        "{errs:?}"
    );
    let errs = errors(
        "[[group]]\nname = \"g\"\nvip = \"127.0.0.9\"\nprovider = \"loopback\"\ninterface = \"lo\"\n",
    );
    assert!(
        errs.iter()
            .any(|(f, l, _)| f == "group[0].interface" && *l == 15),
        "{errs:?}"
    );
}

#[test]
fn names_and_vips_are_unique() {
    let g = |name: &str, vip: &str| {
        format!("[[group]]\nname = \"{name}\"\nvip = \"{vip}\"\nprovider = \"loopback\"\n")
    };
    let errs = errors(&format!(
        "{}{}{}",
        g("a", "127.0.0.9"),
        g("a", "127.0.0.10"),
        g("b", "127.0.0.9")
    ));
    let msgs: Vec<&str> = errs.iter().map(|(_, _, m)| m.as_str()).collect();
    assert!(msgs.iter().any(|m| m.contains("defined twice")), "{errs:?}");
    assert!(msgs.iter().any(|m| m.contains("another group")), "{errs:?}");
}

#[test]
fn groups_need_a_cluster() {
    let text = "[node]\nname = \"a\"\ndata_dir = \"d\"\n[[route]]\ndomains = [\"*\"]\n\
                drop_dir = \"o\"\n[[group]]\nname = \"g\"\nvip = \"127.0.0.9\"\n\
                provider = \"loopback\"\n";
    let Err(ConfigErrors(errs)) = load_str(text, "g.toml") else {
        panic!("loaded without a cluster");
    };
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].message.contains("needs a [cluster]"));
    assert_eq!(errs[0].line, 7);
}

#[test]
fn a_lease_longer_than_a_voter_promises_is_refused() {
    let errs = errors(
        "[[group]]\nname = \"a\"\nvip = \"127.0.0.9\"\nprovider = \"loopback\"\nlease = \"2m\"\n",
    );
    assert!(
        errs.iter()
            .any(|(f, _, m)| f == "group[0].lease" && m.contains("at most 60s")),
        "{errs:?}"
    );
}

#[test]
fn a_node_listener_that_would_take_a_groups_port_is_an_error() {
    let group = "[[group]]\nname = \"mta\"\nvip = \"198.18.0.100/24\"\ninterface = \"eth0\"\n";
    let text = format!("{BASE}{group}[smtp]\nlisten = [\"0.0.0.0:25\", \"127.0.0.1:2525\"]\n");
    let Err(ConfigErrors(errs)) = load_str(&text, "g.toml") else {
        panic!("accepted a wildcard listener on the group's port");
    };
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].field, "smtp.listen");
    assert_eq!(errs[0].line, 16);
    assert!(errs[0].message.contains("group \"mta\""), "{errs:?}");
    // Another port, or another address, is fine.
    let text = format!("{BASE}{group}[smtp]\nlisten = [\"0.0.0.0:2525\", \"198.18.0.1:25\"]\n");
    load_str(&text, "g.toml").unwrap_or_else(|e| panic!("{e}"));
}
