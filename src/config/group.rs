//! `[[group]]`: resource groups — a virtual IP, the SMTP listener on it,
//! and the outbound source address — that the cluster places on one node
//! at a time.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use super::reader::{ms_or, Ctx, Fields, Located};
use super::{GroupConfig, VipProvider};

/// A group's lease unless configured.
pub(super) const DEFAULT_LEASE: Duration = Duration::from_millis(600);

/// Every `[[group]]`, each checked, names unique.
pub(super) fn read_groups(
    ctx: &mut Ctx<'_>,
    root: &mut Fields<'_>,
    in_cluster: bool,
) -> Vec<GroupConfig> {
    let Some(n) = root.take("group") else {
        return Vec::new();
    };
    if !in_cluster {
        let msg = "[[group]] needs a [cluster]: groups are placed by the cluster";
        ctx.error(&n.span, &n.path, msg);
    }
    let Some(tables) = ctx.tables(&n, "an array of tables [[group]]") else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    let mut vips = HashSet::new();
    let mut groups = Vec::new();
    for f in tables {
        let (span, path) = (f.span.clone(), f.path.clone());
        let g = read_group(ctx, f);
        if !g.name.is_empty() && !seen.insert(g.name.clone()) {
            ctx.error(
                &span,
                &path,
                format!("group \"{}\" is defined twice", g.name),
            );
        }
        if let Some(vip) = g.vip {
            if !vips.insert(vip.addr()) {
                let msg = format!("VIP {} belongs to another group already", vip.addr());
                ctx.error(&span, &path, msg);
            }
        }
        groups.push(g);
    }
    groups
}

fn read_group(ctx: &mut Ctx<'_>, mut f: Fields<'_>) -> GroupConfig {
    let name = f
        .require(ctx, "name")
        .and_then(|n| group_name(ctx, &n))
        .unwrap_or_default();
    let vip = f.require(ctx, "vip").and_then(|n| vip(ctx, &n));
    let provider_node = f.take("provider");
    let provider = provider_node
        .as_ref()
        .and_then(|n| {
            let options = [
                ("netlink", VipProvider::Netlink),
                ("loopback", VipProvider::Loopback),
            ];
            ctx.choice(n, &options)
        })
        .unwrap_or(VipProvider::Netlink);
    let interface_node = f.take("interface");
    let interface = interface_node
        .as_ref()
        .and_then(|n| ctx.string(n, "an interface name like \"eth0\""));
    match (provider, &interface_node) {
        (VipProvider::Netlink, None) => {
            let msg = "the netlink provider needs the interface to add the VIP to";
            ctx.error(&f.span, &f.child_path("interface"), msg);
        }
        (VipProvider::Loopback, Some(n)) => {
            let msg = "the loopback provider only binds an address already local: no interface";
            ctx.error(&n.span, &n.path, msg);
        }
        _ => {}
    }
    let preferred_nodes = f
        .take("preferred_nodes")
        .and_then(|n| {
            let what = "a list of node names like [\"node-a\", \"node-b\"]";
            ctx.list(&n, what, false, |ctx, e| ctx.string(e, "a node name"))
        })
        .unwrap_or_default();
    let smtp_port = f
        .take("smtp_port")
        .and_then(|n| ctx.int(&n, 1, 65535))
        .unwrap_or(25) as u16;
    let failback = f
        .take("failback")
        .and_then(|n| ctx.boolean(&n))
        .unwrap_or(false);
    let lease = ms_or(ctx, &mut f, "lease", DEFAULT_LEASE.as_millis() as u64);
    let start_timeout = ms_or(ctx, &mut f, "start_timeout", 10_000);
    let stop_timeout = ms_or(ctx, &mut f, "stop_timeout", 5_000);
    let check_interval = ms_or(ctx, &mut f, "check_interval", 2_000);
    let check_timeout = ms_or(ctx, &mut f, "check_timeout", 1_000);
    let restart_window = ms_or(ctx, &mut f, "restart_window", 300_000);
    let announce_interval = ms_or(ctx, &mut f, "announce_interval", 10_000);
    let drain_timeout = ms_or(ctx, &mut f, "drain_timeout", 30_000);
    let max_restarts = f
        .take("max_restarts")
        .and_then(|n| ctx.int(&n, 0, 100))
        .unwrap_or(3) as u32;
    if lease < Duration::from_millis(100) {
        let msg = "must be at least 100ms: owners renew it four times per lease";
        ctx.error(&f.span, &f.child_path("lease"), msg);
    }
    if lease > Duration::from_secs(60) {
        let msg = "must be at most 60s: a restarted voter holds failovers back for one lease";
        ctx.error(&f.span, &f.child_path("lease"), msg);
    }
    if check_timeout > check_interval {
        let msg = "must not exceed check_interval";
        ctx.error(&f.span, &f.child_path("check_timeout"), msg);
    }
    f.finish(ctx);
    GroupConfig {
        name,
        vip,
        provider,
        interface,
        preferred_nodes,
        smtp_port,
        failback,
        lease,
        start_timeout,
        stop_timeout,
        check_interval,
        check_timeout,
        max_restarts,
        restart_window,
        announce_interval,
        drain_timeout,
    }
}

fn group_name(ctx: &mut Ctx<'_>, n: &Located<'_>) -> Option<String> {
    let what = "a group name of letters, digits, '.', '_' or '-' like \"mta\"";
    let s = ctx.string(n, what)?;
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Some(s)
    } else {
        ctx.mismatch(n, what);
        None
    }
}

/// The VIP with its prefix length (host bits kept: it is an address).
fn vip(ctx: &mut Ctx<'_>, n: &Located<'_>) -> Option<IpNet> {
    const WHAT: &str = "an address with its prefix like \"198.18.0.100/24\"";
    let s = ctx.str(n, WHAT)?;
    let net = IpNet::from_str(s)
        .ok()
        .or_else(|| std::net::IpAddr::from_str(s).ok().map(IpNet::from));
    match net {
        Some(net) if !net.addr().is_unspecified() && !net.addr().is_multicast() => Some(net),
        _ => {
            ctx.mismatch(n, WHAT);
            None
        }
    }
}

#[cfg(test)]
#[path = "group_tests.rs"]
mod tests;

impl GroupConfig {
    /// The delivery group `name` of this node, `node`: no resources but
    /// the delivery gate, only ever placed here (see the cluster's
    /// delivery groups), under the default lease.
    pub fn delivery(name: String, node: String) -> GroupConfig {
        GroupConfig {
            name,
            vip: None,
            provider: VipProvider::Loopback,
            interface: None,
            preferred_nodes: vec![node],
            smtp_port: 0,
            failback: false,
            lease: DEFAULT_LEASE,
            start_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(5),
            check_interval: Duration::from_secs(2),
            check_timeout: Duration::from_secs(1),
            max_restarts: 3,
            restart_window: Duration::from_secs(300),
            announce_interval: Duration::from_secs(10),
            // Nothing to drain: the queue keeps what is not sent.
            drain_timeout: Duration::ZERO,
        }
    }
}
