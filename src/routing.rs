//! Routing: how a queued job leaves. The queue picks a job's route by
//! its recipients' domain; the router sends the job to that route's kind
//! of delivery (SMTP next hops or a drop directory) and decides the
//! address SMTP mail leaves from: the route's own, a group's VIP held
//! here, or, in a cluster, handed over through another node's VIP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::{Config, RouteTarget};
use crate::delivery::tls::OutboundTls;
use crate::delivery::{drop_dir, Destinations, Job, JobResult};
use crate::queue::Dispatch;
use crate::resource::source::SourceSlot;
use crate::spool::Spool;

/// Drop-directory writes at once; each one fsyncs, so a few in parallel
/// keep the disk busy without piling up threads.
const DROP_PARALLELISM: usize = 8;

/// Sends each job to its route's kind of delivery.
pub struct Router {
    /// Routes that name no source address leave from this one (a group's
    /// VIP while it is online here).
    source: SourceSlot,
    /// While no group is online here, such mail goes to a group's owner.
    handover: Option<Handover>,
    spool: Arc<dyn Spool>,
    destinations: Destinations,
    results: mpsc::UnboundedSender<JobResult>,
    drops: Arc<Semaphore>,
    tracker: TaskTracker,
}

/// Where mail goes that SMTP routes would relay from the node's own
/// address: from the VIP of a group the node holds, else to the SMTP
/// listener on another group's VIP, whose owner relays it from the VIP —
/// so next hops only ever see a VIP. This
/// is how a restarted ex-owner hands over what it had queued, and how mail
/// accepted on a node's own address leaves. The owner must let members
/// relay (their addresses in `relay_networks`).
pub struct Handover {
    view: tokio::sync::watch::Receiver<crate::cluster::raft::store::ClusterView>,
    me: u64,
    /// Where handed-on mail leaves from: this node's cluster address, by
    /// which the owner tells it comes from a member.
    from: Option<IpAddr>,
    /// Per group: its name and its SMTP address on the VIP.
    vips: Vec<(String, SocketAddr)>,
}

/// How mail that would leave from this node's own address goes instead.
enum Via {
    /// From the VIP of a group this node holds (its outbound source is
    /// not up yet: if the address is not either, the attempt fails and is
    /// retried).
    From(IpAddr),
    /// Through the SMTP listener on the VIP of a group another node holds.
    Through(SocketAddr),
}

impl Handover {
    /// For node `me` (its incarnation) of the cluster `view` follows, with
    /// the groups and cluster address in `config`.
    pub fn new(
        view: tokio::sync::watch::Receiver<crate::cluster::raft::store::ClusterView>,
        me: u64,
        config: &Config,
    ) -> Handover {
        Handover {
            view,
            me,
            // The owner knows members by their cluster addresses.
            from: config
                .cluster
                .as_ref()
                .map(|cc| cc.listen.ip())
                .filter(|ip| !ip.is_unspecified()),
            vips: config
                .groups
                .iter()
                .filter_map(|g| Some((g.name.clone(), SocketAddr::new(g.vip?.addr(), g.smtp_port))))
                .collect(),
        }
    }

    /// Through a group another node holds now — else the first group:
    /// while none is held the attempt fails and is retried, rather than
    /// the mail leaving from this node's own address. None without groups.
    fn via(&self) -> Option<Via> {
        let v = self.view.borrow();
        let live = |name: &String| {
            let g = v.state.groups.get(name)?;
            (!g.revoked && !g.released).then_some(g.owner?)
        };
        let mine = self.vips.iter().find(|(n, _)| live(n) == Some(self.me));
        if let Some((_, addr)) = mine {
            return Some(Via::From(addr.ip()));
        }
        let other = self.vips.iter().find(|(n, _)| live(n).is_some());
        other
            .or(self.vips.first())
            .map(|(_, addr)| Via::Through(*addr))
    }
}

impl Router {
    /// Route SMTP mail from `source` unless its route names an address,
    /// handing it over through `handover` while `source` is empty; drop
    /// directories read bodies from `spool`; delivery results go to
    /// `results`, drop-directory writes run on `tracker`.
    pub fn new(
        source: SourceSlot,
        handover: Option<Handover>,
        spool: Arc<dyn Spool>,
        destinations: Destinations,
        results: mpsc::UnboundedSender<JobResult>,
        tracker: TaskTracker,
    ) -> Router {
        Router {
            source,
            handover,
            spool,
            destinations,
            results,
            drops: Arc::new(Semaphore::new(DROP_PARALLELISM)),
            tracker,
        }
    }
}

impl Dispatch for Router {
    fn dispatch(&self, route: usize, r: Arc<crate::config::Route>, job: Job) {
        match &r.target {
            RouteTarget::Smtp(hops) => {
                let own = r.source_address.or_else(|| self.source.get());
                let via = own
                    .is_none()
                    .then(|| self.handover.as_ref()?.via())
                    .flatten();
                let member = self.handover.as_ref().and_then(|h| h.from);
                let tls = OutboundTls::of(&r);
                let d = &self.destinations;
                match via {
                    // To a cluster member's VIP: inside the cluster.
                    Some(Via::Through(vip)) => {
                        d.submit(route, &[vip], member, &OutboundTls::NONE, job)
                    }
                    Some(Via::From(vip)) => d.submit(route, hops, Some(vip), &tls, job),
                    None => d.submit(route, hops, own, &tls, job),
                }
            }
            RouteTarget::DropDir(dir) => {
                let dir = dir.clone();
                let spool = self.spool.clone();
                let results = self.results.clone();
                let drops = self.drops.clone();
                self.tracker.spawn(async move {
                    let _permit = drops.acquire_owned().await;
                    let written = match spool.body(job.id).await {
                        Ok(body) => write_drop(dir.clone(), job.clone(), body).await,
                        Err(e) => Err(std::io::Error::other(e.to_string())),
                    };
                    let _ = results.send(drop_dir::result(route, &dir, &job, written));
                });
            }
        }
    }
}

async fn write_drop(
    dir: std::path::PathBuf,
    job: Job,
    body: Bytes,
) -> std::io::Result<std::path::PathBuf> {
    tokio::task::spawn_blocking(move || drop_dir::write(&dir, &job, &body))
        .await
        .map_err(std::io::Error::other)?
}
