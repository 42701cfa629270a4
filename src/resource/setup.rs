//! This node's groups, started from configuration: the leader's manager
//! (on every node; it acts only while the node leads) and, on members, a
//! runner per group with its resources — the VIP, the SMTP listener on it
//! and the outbound source address, in that order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::gate::{DeliveryGate, Ready};
use super::listener::SmtpListener;
use super::netlink::NetlinkVip;
use super::runner::GroupRunner;
use super::source::{DeliverySource, SourceSlot};
use super::vip::LoopbackVip;
use super::Resource;
use crate::cluster::groups::manager::{self, GroupPolicy};
use crate::cluster::node::ClusterNode;
use crate::cluster::state::groups::delivery_group;
use crate::config::{ClusterRole, Config, GroupConfig, VipProvider};
use crate::delivery::gate::Gate;
use crate::smtp::clients::Clients;
use crate::smtp::Accept;
use tokio::sync::watch;

/// The running groups of this node.
pub struct Groups {
    cancel: CancellationToken,
    /// Cleans up, then runs every runner to its end.
    task: Option<JoinHandle<()>>,
}

/// Start the manager and this node's group runners.
pub fn start(
    config: &Config,
    (smtp, clients): (
        watch::Receiver<Arc<crate::config::SmtpConfig>>,
        Arc<Clients>,
    ),
    cluster: &ClusterNode,
    intake: Arc<dyn Accept>,
    (source, gate, ready): (SourceSlot, Arc<Gate>, Option<Ready>),
    cluster_cancel: CancellationToken,
) -> Groups {
    let none = Groups {
        cancel: CancellationToken::new(),
        task: None,
    };
    let Some(cc) = &config.cluster else {
        return none;
    };
    // Every node runs the manager (it acts only while the node leads), so
    // that a leader without groups of its own still keeps those of others.
    let policies = config
        .groups
        .iter()
        .map(|g| GroupPolicy {
            name: g.name.clone(),
            preferred: g.preferred_nodes.clone(),
            failback: g.failback,
            lease: g.lease,
            handover: g.drain_timeout + g.stop_timeout,
        })
        .collect();
    tokio::spawn(manager::run(
        cluster.handle.clone(),
        policies,
        cc.heartbeat_interval,
        cluster_cancel,
    ));
    if cc.role == ClusterRole::Witness {
        return none;
    }
    // The member's delivery group: it delivers while it holds the lease.
    let me = config.node.name.clone();
    let delivery = GroupConfig::delivery(delivery_group(&me), me);
    let gate: Arc<dyn Resource> = Arc::new(DeliveryGate::new(gate, ready));
    let delivery = GroupRunner::new(delivery, vec![gate], cluster.handle.clone());
    let mut pending = Vec::new();
    for g in &config.groups {
        let Some(vip) = g.vip else { continue };
        let smtp = (smtp.clone(), clients.clone());
        let resources = resources(g, vip.addr(), smtp, intake.clone(), &source);
        pending.push(GroupRunner::new(
            g.clone(),
            resources,
            cluster.handle.clone(),
        ));
    }
    let (config, stop) = (config.clone(), none.cancel.clone());
    let task = tokio::spawn(async move {
        // Clean up after a previous life that could not (killed, crashed)
        // before anything starts.
        for r in release_vips(&config).await {
            if let Err(e) = r {
                tracing::error!(error = %e, "cannot remove a VIP left from before");
            }
        }
        // Released last at a stop: the queue delivers what the other
        // groups' draining sessions accept.
        let last = CancellationToken::new();
        let delivering = tokio::spawn(delivery.run(last.clone()));
        let running: Vec<_> = pending
            .into_iter()
            .map(|r| tokio::spawn(r.run(stop.child_token())))
            .collect();
        for r in running {
            let _ = r.await;
        }
        // With no other group, nothing above waited for the stop.
        stop.cancelled().await;
        last.cancel();
        let _ = delivering.await;
    });
    Groups {
        cancel: none.cancel,
        task: Some(task),
    }
}

fn resources(
    g: &GroupConfig,
    vip: std::net::IpAddr,
    (smtp, clients): (
        watch::Receiver<Arc<crate::config::SmtpConfig>>,
        Arc<Clients>,
    ),
    intake: Arc<dyn Accept>,
    source: &SourceSlot,
) -> Vec<Arc<dyn Resource>> {
    let address: Arc<dyn Resource> = match (g.provider, g.vip) {
        (VipProvider::Netlink, Some(net)) => Arc::new(NetlinkVip::new(
            net,
            g.interface.clone().unwrap_or_default(),
            g.announce_interval,
        )),
        _ => Arc::new(LoopbackVip::new(vip)),
    };
    let listen = SocketAddr::new(vip, g.smtp_port);
    vec![
        address,
        Arc::new(SmtpListener::new(
            listen,
            (smtp, clients),
            intake,
            g.drain_timeout,
        )),
        Arc::new(DeliverySource::new(source.clone(), vip)),
    ]
}

/// Remove this node's netlink VIPs from their interfaces. A node owns no
/// group when it starts, nor once its process has died — systemd runs
/// `mtad release` after the daemon exits for any reason (SIGKILL, crash,
/// watchdog), since the kernel keeps an address its owner left behind and
/// would go on answering ARP for it. Returns what was done, per VIP.
pub async fn release_vips(config: &Config) -> Vec<Result<String, String>> {
    let mut out = Vec::new();
    for g in &config.groups {
        let (VipProvider::Netlink, Some(net), Some(iface)) = (g.provider, g.vip, &g.interface)
        else {
            continue;
        };
        let vip = NetlinkVip::new(net, iface.clone(), g.announce_interval);
        // Under the group's stop deadline: a hung netlink call must not
        // hold up the other groups, the node's start, or systemd.
        let what = format!("vip {net} on {iface}");
        let deadline = tokio::time::Instant::now() + g.stop_timeout;
        let done = super::run_op(what, vip.stop(), deadline).await;
        out.push(done.map(|()| format!("{net} is not on {iface}")));
    }
    out
}

impl Groups {
    /// Release every group (drain, stop, report offline), waiting at most
    /// `within` in all.
    pub async fn stop(self, within: Duration) {
        self.cancel.cancel();
        let Some(task) = self.task else { return };
        if tokio::time::timeout(within, task).await.is_err() {
            tracing::warn!("groups did not stop in time");
        }
    }
}
