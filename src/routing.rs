//! Routing: how a queued job leaves. The queue picks a job's route by
//! its recipients' domain; the router sends the job to that route's kind
//! of delivery (SMTP next hops, the recipient domain's MX hosts, or a drop
//! directory) and decides the address SMTP mail leaves from: the route's
//! own, a group's VIP held here, or, in a cluster, handed over through
//! another node's VIP.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::{Config, Route, RouteTarget};
use crate::delivery::tls::OutboundTls;
use crate::delivery::{drop_dir, Destinations, Job, JobResult, Outcome};
use crate::dns::{MxError, MxResolver};
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
    /// How MX routes find their next hops (None: the resolver could not be
    /// made; such mail is deferred with the reason).
    mx: Result<Arc<MxResolver>, String>,
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
            mx: Err("no [dns] resolver was set up".into()),
        }
    }

    /// MX routes resolve through `mx`.
    pub fn with_mx(mut self, mx: Result<Arc<MxResolver>, String>) -> Router {
        self.mx = mx;
        self
    }

    /// Send `job` to the MX hosts of its recipients' domains: one job per
    /// domain, each once its lookup is done (never holding up the others).
    fn dispatch_mx(&self, route: usize, r: &Route, port: u16, job: Job) {
        let leg = leg(r, &[], &self.source, self.handover.as_ref());
        if !leg.hops.is_empty() {
            // Handed over through another node's VIP: it resolves.
            self.destinations
                .submit(route, &leg.hops, leg.source, &leg.tls, job);
            return;
        }
        let (source, tls) = (leg.source, leg.tls);
        for job in by_domain(job) {
            let domain = domain_of(&job.recipients[0].address).to_string();
            let (mx, destinations) = (self.mx.clone(), self.destinations.clone());
            let (results, tls) = (self.results.clone(), tls.clone());
            self.tracker.spawn(async move {
                let hops = match &mx {
                    Ok(mx) => mx.next_hops(&domain, port).await,
                    Err(e) => Err(MxError::Temporary(format!("451 4.4.3 no resolver: {e}"))),
                };
                match hops {
                    Ok(hops) => destinations.submit(route, &hops, source, &tls, job),
                    Err(e) => {
                        let _ = results.send(unresolved(route, &domain, &job, &e));
                    }
                }
            });
        }
    }
}

/// The domain of `address` (after its last `@`), lower-cased by the queue.
fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, d)| d)
}

/// `job` split by recipient domain.
fn by_domain(job: Job) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    for rcpt in job.recipients.iter().cloned() {
        let domain = domain_of(&rcpt.address).to_ascii_lowercase();
        match jobs
            .iter_mut()
            .find(|j| domain_of(&j.recipients[0].address).eq_ignore_ascii_case(&domain))
        {
            Some(j) => j.recipients.push(rcpt),
            None => jobs.push(Job {
                recipients: vec![rcpt],
                ..job.clone()
            }),
        }
    }
    jobs
}

/// Every recipient of `job` deferred or bounced as `e` says.
fn unresolved(route: usize, domain: &str, job: &Job, e: &MxError) -> JobResult {
    let outcome = match e {
        MxError::Permanent(_) => Outcome::Failed,
        MxError::Temporary(_) => Outcome::Deferred,
    };
    JobResult::all(job, route, format!("MX of {domain}"), outcome, e.reply())
}

/// Where a job on an SMTP route goes, and how.
#[derive(Debug, PartialEq)]
struct Leg<'a> {
    /// Next hops, tried in order.
    hops: Cow<'a, [SocketAddr]>,
    /// The address it leaves from (None: the one the kernel picks).
    source: Option<IpAddr>,
    /// TLS toward the next hop.
    tls: OutboundTls,
}

/// How a job on SMTP route `r`, whose next hops are `hops`, leaves: from
/// the route's own source address, else from the VIP `slot` holds, else
/// as `handover` says (in a cluster), else from this node's address.
fn leg<'a>(
    r: &Route,
    hops: &'a [SocketAddr],
    slot: &SourceSlot,
    handover: Option<&Handover>,
) -> Leg<'a> {
    let own = r.source_address.or_else(|| slot.get());
    let via = own.is_none().then(|| handover?.via()).flatten();
    match via {
        // To a cluster member's VIP: inside the cluster.
        Some(Via::Through(vip)) => Leg {
            hops: Cow::Owned(vec![vip]),
            source: handover.and_then(|h| h.from),
            tls: OutboundTls::NONE,
        },
        Some(Via::From(vip)) => Leg {
            hops: Cow::Borrowed(hops),
            source: Some(vip),
            tls: OutboundTls::of(r),
        },
        None => Leg {
            hops: Cow::Borrowed(hops),
            source: own,
            tls: OutboundTls::of(r),
        },
    }
}

impl Dispatch for Router {
    fn dispatch(&self, route: usize, r: Arc<Route>, job: Job) {
        match &r.target {
            RouteTarget::Smtp(hops) => {
                let leg = leg(&r, hops, &self.source, self.handover.as_ref());
                self.destinations
                    .submit(route, &leg.hops, leg.source, &leg.tls, job);
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
            RouteTarget::Mx { port } => self.dispatch_mx(route, &r, *port, job),
        }
    }
}

/// Write `job` with `body` into the drop directory `dir`, off the runtime's
/// threads (the write ends with an fsync).
async fn write_drop(
    dir: std::path::PathBuf,
    job: Job,
    body: Bytes,
) -> std::io::Result<std::path::PathBuf> {
    tokio::task::spawn_blocking(move || drop_dir::write(&dir, &job, &body))
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::cluster::raft::store::ClusterView;
    use crate::cluster::state::groups::GroupState;
    use crate::config::TlsPolicy;
    use crate::delivery::{JobRcpt, Outcome};
    use crate::resource::source::DeliverySource;
    use crate::resource::Resource;
    use crate::spool::memory::MemorySpool;
    use crate::spool::{Envelope, QueueId, RcptState, Recipient};

    /// This node's incarnation in the handover tests.
    const ME: u64 = 1;
    /// Another member's.
    const OTHER: u64 = 2;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// An SMTP route to 192.0.2.25 with TLS required.
    fn route(source_address: Option<IpAddr>) -> Route {
        Route {
            domains: vec!["*".into()],
            target: RouteTarget::Smtp(vec![addr("192.0.2.25:25")]),
            source_address,
            tls: TlsPolicy::Required,
            tls_ca: None,
            tls_name: Some("mx.example".into()),
        }
    }

    fn hops(r: &Route) -> &[SocketAddr] {
        match &r.target {
            RouteTarget::Smtp(h) => h,
            RouteTarget::DropDir(_) | RouteTarget::Mx { .. } => unreachable!(),
        }
    }

    /// Groups g0, g1, ... on VIPs 198.18.0.100, .101, ... port 2525, in
    /// the state given (None: not in the cluster's state at all); this
    /// node's cluster address is 10.0.0.1.
    fn handover(groups: &[Option<GroupState>]) -> Handover {
        let mut view = ClusterView::default();
        let mut vips = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            let name = format!("g{i}");
            if let Some(g) = g {
                view.state.groups.insert(name.clone(), g.clone());
            }
            vips.push((
                name,
                SocketAddr::new(ip(&format!("198.18.0.{}", 100 + i)), 2525),
            ));
        }
        Handover {
            view: watch::channel(view).1,
            me: ME,
            from: Some(ip("10.0.0.1")),
            vips,
        }
    }

    fn owned_by(owner: u64) -> Option<GroupState> {
        Some(GroupState {
            owner: Some(owner),
            ..Default::default()
        })
    }

    #[test]
    fn a_route_leaves_from_its_own_address_with_its_own_tls() {
        let r = route(Some(ip("192.0.2.1")));
        // Even with a VIP here and groups elsewhere: the route's address wins.
        let slot = SourceSlot::default();
        let h = handover(&[owned_by(OTHER)]);
        let leg = leg(&r, hops(&r), &slot, Some(&h));
        assert_eq!(
            leg,
            Leg {
                hops: Cow::Borrowed(&[addr("192.0.2.25:25")][..]),
                source: Some(ip("192.0.2.1")),
                tls: OutboundTls::of(&r),
            }
        );
        assert_eq!(leg.tls.policy, TlsPolicy::Required);
    }

    #[tokio::test]
    async fn without_an_address_of_its_own_a_route_leaves_from_the_vip_held_here() {
        let r = route(None);
        let slot = SourceSlot::default();
        DeliverySource::new(slot.clone(), ip("198.18.0.100"))
            .start()
            .await
            .unwrap();
        let h = handover(&[owned_by(OTHER)]);
        let leg = leg(&r, hops(&r), &slot, Some(&h));
        assert_eq!(leg.hops[..], [addr("192.0.2.25:25")]);
        assert_eq!(leg.source, Some(ip("198.18.0.100")));
        assert_eq!(leg.tls, OutboundTls::of(&r));
    }

    #[test]
    fn a_single_node_leaves_from_its_own_address() {
        let r = route(None);
        let leg = leg(&r, hops(&r), &SourceSlot::default(), None);
        assert_eq!(leg.hops[..], [addr("192.0.2.25:25")]);
        assert_eq!(leg.source, None);
        assert_eq!(leg.tls, OutboundTls::of(&r));
        // A cluster node without groups too: nothing to hand over to.
        let h = handover(&[]);
        assert_eq!(
            leg,
            super::leg(&r, hops(&r), &SourceSlot::default(), Some(&h))
        );
    }

    #[test]
    fn a_group_this_node_holds_lends_its_vip_before_the_slot_is_up() {
        let r = route(None);
        // g0 is another node's, g1 this one's: from g1's VIP, not via g0.
        let h = handover(&[owned_by(OTHER), owned_by(ME)]);
        let leg = leg(&r, hops(&r), &SourceSlot::default(), Some(&h));
        assert_eq!(leg.hops[..], [addr("192.0.2.25:25")]);
        assert_eq!(leg.source, Some(ip("198.18.0.101")));
        assert_eq!(leg.tls, OutboundTls::of(&r));
    }

    #[test]
    fn mail_is_handed_over_through_the_vip_of_a_group_another_node_holds() {
        let r = route(None);
        // g0 is not placed, g1 is revoked, g2 is another node's.
        let revoked = Some(GroupState {
            owner: Some(OTHER),
            revoked: true,
            ..Default::default()
        });
        let h = handover(&[Some(GroupState::default()), revoked, owned_by(OTHER)]);
        let leg = leg(&r, hops(&r), &SourceSlot::default(), Some(&h));
        // To the owner's SMTP listener on the VIP, from this node's
        // cluster address (so the owner lets it relay), without TLS.
        assert_eq!(leg.hops[..], [addr("198.18.0.102:2525")]);
        assert_eq!(leg.source, Some(ip("10.0.0.1")));
        assert_eq!(leg.tls, OutboundTls::NONE);
    }

    #[test]
    fn while_no_group_is_held_anywhere_mail_waits_on_the_first_groups_vip() {
        let r = route(None);
        let released = Some(GroupState {
            owner: Some(ME),
            released: true,
            ..Default::default()
        });
        let h = handover(&[None, released]);
        let leg = leg(&r, hops(&r), &SourceSlot::default(), Some(&h));
        // Not from this node's own address: the attempt fails and is
        // retried until a group is placed.
        assert_eq!(leg.hops[..], [addr("198.18.0.100:2525")]);
        assert_eq!(leg.source, Some(ip("10.0.0.1")));
        assert_eq!(leg.tls, OutboundTls::NONE);
    }

    #[test]
    fn the_handover_takes_the_groups_vips_and_the_cluster_address_from_the_config() {
        let text = |listen: &str| {
            format!(
                "[node]\nname = \"n1\"\ndata_dir = \"./d\"\n\
                 [cluster]\nname = \"c\"\nlisten = \"{listen}\"\nsecret_file = \"s.key\"\n\
                 [[group]]\nname = \"mx\"\nvip = \"198.18.0.100/32\"\nprovider = \"loopback\"\n\
                 smtp_port = 2526\n\
                 [[route]]\ndomains = [\"*\"]\nnext_hops = [\"192.0.2.25:25\"]\n"
            )
        };
        let load = |listen| crate::config::load_str(&text(listen), "t.toml").unwrap();
        let view = || watch::channel(ClusterView::default()).1;
        let h = Handover::new(view(), ME, &load("10.0.0.1:7400"));
        assert_eq!(h.from, Some(ip("10.0.0.1")));
        assert_eq!(h.vips, [("mx".to_string(), addr("198.18.0.100:2526"))]);
        // Listening on every address names none the owner could know.
        let h = Handover::new(view(), ME, &load("0.0.0.0:7400"));
        assert_eq!(h.from, None);
    }

    #[tokio::test]
    async fn a_drop_dir_route_writes_the_message_and_reports_it_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let spool = MemorySpool::new();
        let id = QueueId(7);
        let envelope = Envelope {
            id,
            sender: "s@example.org".into(),
            recipients: vec![Recipient {
                address: "r@example.net".into(),
                state: RcptState::Pending { attempts: 0 },
            }],
            arrived_ms: 0,
            holders: Vec::new(),
        };
        spool.insert(envelope, Bytes::from_static(b"Subject: hi\r\n\r\nbody\r\n"));
        let config = crate::config::load_str(
            "[node]\nname = \"n1\"\ndata_dir = \"./d\"\n\
             [[route]]\ndomains = [\"*\"]\ndrop_dir = \"./out\"\n",
            "t.toml",
        )
        .unwrap();
        let (results_tx, mut results) = mpsc::unbounded_channel();
        let tracker = TaskTracker::new();
        let spool: Arc<dyn Spool> = Arc::new(spool);
        let destinations = Destinations::new(
            watch::channel(Arc::new(config.delivery.clone())).1,
            "mx.example".into(),
            spool.clone(),
            results_tx.clone(),
            CancellationToken::new(),
            tracker.clone(),
            crate::delivery::gate::Gate::always(),
        );
        let router = Router::new(
            SourceSlot::default(),
            None,
            spool,
            destinations,
            results_tx,
            tracker,
        );
        let r = Route {
            target: RouteTarget::DropDir(dir.path().to_path_buf()),
            ..route(None)
        };
        let job = Job {
            id,
            sender: "s@example.org".into(),
            recipients: vec![JobRcpt {
                index: 0,
                address: "r@example.net".into(),
            }],
            expires_ms: 0,
        };
        router.dispatch(3, Arc::new(r), job);
        let result = results.recv().await.unwrap();
        assert_eq!((result.id, result.route), (id, 3));
        assert_eq!(result.results.len(), 1);
        assert_eq!(result.results[0].outcome, Outcome::Delivered);
        let written: BTreeMap<_, _> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .map(|name| {
                let text = std::fs::read_to_string(dir.path().join(&name)).unwrap();
                (name, text)
            })
            .collect();
        let file = &written[&format!("{id}-0.eml")];
        assert!(file.ends_with("Subject: hi\r\n\r\nbody\r\n"), "{file}");
    }
}
