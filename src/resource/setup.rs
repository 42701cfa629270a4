//! This node's groups, started from configuration: the leader's manager
//! (on every node; it acts only while the node leads) and, on members, a
//! runner per group with its resources — the VIP, the SMTP listener on it
//! and the outbound source address, in that order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::listener::SmtpListener;
use super::runner::GroupRunner;
use super::source::{DeliverySource, SourceSlot};
use super::vip::LoopbackVip;
use super::Resource;
use crate::cluster::manager::{self, GroupPolicy};
use crate::cluster::node::ClusterNode;
use crate::config::{ClusterRole, Config, GroupConfig, VipProvider};
use crate::smtp::Accept;

/// The running groups of this node.
pub struct Groups {
    cancel: CancellationToken,
    runners: Vec<JoinHandle<()>>,
}

/// Start the manager and this node's group runners.
pub fn start(
    config: &Config,
    cluster: &ClusterNode,
    intake: Arc<dyn Accept>,
    source: SourceSlot,
    cluster_cancel: CancellationToken,
) -> Groups {
    let cancel = CancellationToken::new();
    let mut runners = Vec::new();
    let Some(cc) = &config.cluster else {
        return Groups { cancel, runners };
    };
    if config.groups.is_empty() {
        return Groups { cancel, runners };
    }
    let policies = config
        .groups
        .iter()
        .map(|g| GroupPolicy {
            name: g.name.clone(),
            preferred: g.preferred_nodes.clone(),
            failback: g.failback,
            lease: g.lease,
        })
        .collect();
    tokio::spawn(manager::run(
        cluster.handle.clone(),
        policies,
        cc.heartbeat_interval,
        cluster_cancel,
    ));
    if cc.role == ClusterRole::Witness {
        return Groups { cancel, runners };
    }
    let smtp = Arc::new(config.smtp.clone());
    for g in &config.groups {
        let Some(vip) = g.vip else { continue };
        let resources = resources(g, vip.addr(), smtp.clone(), intake.clone(), &source);
        let runner = GroupRunner::new(g.clone(), resources, cluster.handle.clone());
        runners.push(tokio::spawn(runner.run(cancel.child_token())));
    }
    Groups { cancel, runners }
}

fn resources(
    g: &GroupConfig,
    vip: std::net::IpAddr,
    smtp: Arc<crate::config::SmtpConfig>,
    intake: Arc<dyn Accept>,
    source: &SourceSlot,
) -> Vec<Arc<dyn Resource>> {
    let address: Arc<dyn Resource> = match g.provider {
        VipProvider::Loopback => Arc::new(LoopbackVip::new(vip)),
        // Until the netlink provider lands, a netlink group is refused at
        // start with a clear reason rather than silently bound.
        VipProvider::Netlink => Arc::new(super::vip::Unsupported::new(vip, "netlink")),
    };
    let listen = SocketAddr::new(vip, g.smtp_port);
    vec![
        address,
        Arc::new(SmtpListener::new(listen, smtp, intake, g.drain_timeout)),
        Arc::new(DeliverySource::new(source.clone(), vip)),
    ]
}

impl Groups {
    /// Release every group (drain, stop, report offline), waiting at most
    /// `within` in all.
    pub async fn stop(self, within: Duration) {
        self.cancel.cancel();
        let all = async {
            for r in self.runners {
                let _ = r.await;
            }
        };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!("groups did not stop in time");
        }
    }
}
