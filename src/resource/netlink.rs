//! The netlink VIP provider: add the address to an interface with
//! rtnetlink, announce it (gratuitous ARP / unsolicited neighbour
//! advertisement, three times, spaced, then again every announce
//! interval so stale caches heal), and remove it on stop. The health check
//! looks the address up on the interface.
//!
//! The address is fenced below the process too: it is added with a kernel
//! lifetime that runs out with the group's lease (whole seconds, rounded
//! up), refreshed at every renewal, so the kernel drops it even when this
//! process is frozen and cannot. The next owner claims it only once
//! nobody answers for it any more (an ARP probe, RFC 5227), so a frozen
//! former owner's kernel and the new owner never answer side by side
//! (IPv6: a neighbour solicitation, see [`super::claim`]). And
//! nothing is announced, nor the lifetime refreshed, once the lease has
//! run out by this process's clock — a process thawed after its lease
//! stops without a word.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, CacheInfo,
};
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::announce::{self, Mac};
use super::claim;
use super::{OpFuture, Resource};

/// Announcements right after the address is added, this far apart.
const FIRST_ANNOUNCEMENTS: u32 = 3;
const ANNOUNCE_SPACING: Duration = Duration::from_millis(200);
/// A claim's ARP probes, and how long it listens after each.
const PROBES: u32 = 3;
const PROBE_SPACING: Duration = Duration::from_millis(40);

/// A VIP this node adds to an interface itself.
#[derive(Clone)]
pub struct NetlinkVip {
    inner: Arc<Inner>,
}

struct Inner {
    vip: IpNet,
    interface: String,
    announce_every: Duration,
    /// Until when the group's lease holds (None: not known yet).
    lease: watch::Sender<Option<Instant>>,
    /// While up: the netlink handle that added the address, and the task
    /// that announces it and refreshes its lifetime. The stop removes the
    /// address through the same handle, so a refresh already queued is
    /// carried out before the removal, never after.
    up: Mutex<Option<(Handle, JoinHandle<()>)>>,
}

impl NetlinkVip {
    /// The provider for `vip` on `interface`, re-announcing every
    /// `announce_every`.
    pub fn new(vip: IpNet, interface: String, announce_every: Duration) -> NetlinkVip {
        NetlinkVip {
            inner: Arc::new(Inner {
                vip,
                interface,
                announce_every,
                lease: watch::Sender::new(None),
                up: Mutex::new(None),
            }),
        }
    }
}

fn connect() -> Result<Handle, String> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("cannot open netlink: {e}"))?;
    // The connection task ends once the last handle is dropped.
    tokio::spawn(conn);
    Ok(handle)
}

/// The interface's index and MAC.
async fn link(handle: &Handle, name: &str) -> Result<(u32, Option<Mac>), String> {
    let msg = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("interface {name}: {e}"))?
        .ok_or_else(|| format!("no interface {name}"))?;
    let mac = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => b.as_slice().try_into().ok(),
        _ => None,
    });
    Ok((msg.header.index, mac))
}

/// The address messages for `ip` on interface `index`.
async fn find(handle: &Handle, index: u32, ip: IpAddr) -> Result<Vec<AddressMessage>, String> {
    let all: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("listing addresses: {e}"))?;
    Ok(all
        .into_iter()
        .filter(|m| {
            m.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Local(x) | AddressAttribute::Address(x) if *x == ip)
            })
        })
        .collect())
}

fn announce_once(index: u32, mac: Mac, ip: IpAddr) {
    let sent = match ip {
        IpAddr::V4(v4) => announce::send_garp(index, mac, v4),
        IpAddr::V6(v6) => announce::send_na(index, mac, v6),
    };
    if let Err(e) = sent {
        tracing::warn!(%ip, error = %e, "cannot announce the VIP");
    }
}

/// The kernel lifetime that covers a lease until `until`: whole seconds,
/// rounded up, at least one.
fn lifetime(until: Instant, now: Instant) -> u32 {
    let left = until.saturating_duration_since(now);
    (left.as_millis().div_ceil(1000) as u32).max(1)
}

/// The request that adds the address (or, if it is there, sets its
/// lifetime) to last `secs` seconds.
fn add_request(handle: &Handle, index: u32, vip: IpNet, secs: u32) -> rtnetlink::AddressAddRequest {
    let mut add = handle
        .address()
        .add(index, vip.addr(), vip.prefix_len())
        .replace();
    let msg = add.message_mut();
    if vip.addr().is_ipv6() {
        // No duplicate address detection by the kernel: the claim already
        // made sure nobody holds it, and a tentative address could not be
        // bound (outbound mail from it would fail meanwhile).
        msg.header.flags |= AddressHeaderFlags::Nodad;
    }
    let mut life = CacheInfo::default();
    life.ifa_valid = secs;
    life.ifa_preferred = secs;
    msg.attributes.push(AddressAttribute::CacheInfo(life));
    add
}

impl Inner {
    /// The lease's end, if it has not passed.
    fn live_until(&self) -> Option<Instant> {
        (*self.lease.borrow()).filter(|until| *until > Instant::now())
    }

    /// While up: announce, and keep the kernel's lifetime in step with the
    /// lease; never once the lease has run out.
    async fn keep(self: Arc<Self>, handle: Handle, index: u32, mac: Option<Mac>) {
        let ip = self.vip.addr();
        let mut lease = self.lease.subscribe();
        let mut announced = 0;
        let mut next = Instant::now();
        loop {
            tokio::select! {
                changed = lease.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.refresh(&handle, index).await;
                }
                _ = tokio::time::sleep_until(next), if mac.is_some() => {
                    if let (Some(mac), Some(_)) = (mac, self.live_until()) {
                        announce_once(index, mac, ip);
                    }
                    announced += 1;
                    next = Instant::now() + if announced < FIRST_ANNOUNCEMENTS {
                        ANNOUNCE_SPACING
                    } else {
                        self.announce_every
                    };
                }
            }
        }
    }

    async fn remove_through(&self, handle: &Handle) -> Result<(), String> {
        let (index, _) = link(handle, &self.interface).await?;
        remove(handle, index, self.vip.addr()).await
    }

    /// Set the address's lifetime to cover the lease now known.
    async fn refresh(&self, handle: &Handle, index: u32) {
        let Some(until) = self.live_until() else {
            return;
        };
        let secs = lifetime(until, Instant::now());
        if let Err(e) = add_request(handle, index, self.vip, secs).execute().await {
            tracing::warn!(vip = %self.vip, error = %e, "cannot refresh the VIP's lifetime");
            return;
        }
        // The kernel adds an address a refresh names even if it had
        // dropped it: had this process been frozen between the check and
        // the request, the address would be back after the lease. Then
        // take it away again at once.
        if Instant::now() >= until {
            tracing::error!(vip = %self.vip, "the lease ran out during a refresh: removing the VIP");
            if let Err(e) = remove(handle, index, self.vip.addr()).await {
                tracing::error!(vip = %self.vip, error = %e, "cannot remove the VIP");
            }
        }
    }
}

/// Remove every address message for `ip` on interface `index`.
async fn remove(handle: &Handle, index: u32, ip: IpAddr) -> Result<(), String> {
    for msg in find(handle, index, ip).await? {
        handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|e| format!("removing {ip}: {e}"))?;
    }
    Ok(())
}

impl Resource for NetlinkVip {
    fn name(&self) -> String {
        format!("vip {} on {}", self.inner.vip, self.inner.interface)
    }

    fn claim(&self) -> OpFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let ip = inner.vip.addr();
            let handle = connect()?;
            let (index, mac) = link(&handle, &inner.interface).await?;
            if !find(&handle, index, ip).await?.is_empty() {
                return Ok(()); // ours already: a restart in place
            }
            let Some(mac) = mac else {
                return Ok(()); // no neighbours to ask
            };
            let probed = tokio::task::spawn_blocking(move || match ip {
                IpAddr::V4(v4) => claim::probe_arp(index, mac, v4, PROBES, PROBE_SPACING),
                IpAddr::V6(v6) => claim::probe_nd(index, mac, v6, PROBES, PROBE_SPACING),
            })
            .await
            .map_err(|e| format!("probing for {ip}: {e}"))?
            .map_err(|e| format!("probing for {ip}: {e}"))?;
            match probed {
                None => Ok(()),
                Some(other) => Err(format!(
                    "{ip} is still answered for by {}",
                    announce::mac_text(&other)
                )),
            }
        })
    }

    fn start(&self) -> OpFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let until = inner
                .live_until()
                .ok_or_else(|| format!("no lease for {}", inner.vip))?;
            let handle = connect()?;
            let (index, mac) = link(&handle, &inner.interface).await?;
            let secs = lifetime(until, Instant::now());
            add_request(&handle, index, inner.vip, secs)
                .execute()
                .await
                .map_err(|e| format!("adding {} to {}: {e}", inner.vip, inner.interface))?;
            tracing::info!(vip = %inner.vip, interface = %inner.interface, lifetime_s = secs, "VIP added");
            let keeper = tokio::spawn(inner.clone().keep(handle.clone(), index, mac));
            let old = inner
                .up
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace((handle, keeper));
            if let Some((_, task)) = old {
                task.abort();
            }
            Ok(())
        })
    }

    fn stop(&self) -> OpFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let up = inner.up.lock().unwrap_or_else(|e| e.into_inner()).take();
            let mut removed = Err(String::new());
            if let Some((handle, keeper)) = up {
                // No announcement nor refresh from here on; one already
                // queued on this handle goes out before the removal.
                keeper.abort();
                removed = inner.remove_through(&handle).await;
            }
            if removed.is_err() {
                // Not up, or that handle's connection is gone.
                removed = inner.remove_through(&connect()?).await;
            }
            removed?;
            tracing::info!(vip = %inner.vip, interface = %inner.interface, "VIP removed");
            Ok(())
        })
    }

    fn lease(&self, until: Instant) {
        self.inner.lease.send_replace(Some(until));
    }

    fn check(&self) -> OpFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let handle = connect()?;
            let (index, _) = link(&handle, &inner.interface).await?;
            if find(&handle, index, inner.vip.addr()).await?.is_empty() {
                return Err(format!(
                    "{} is not on {}",
                    inner.vip.addr(),
                    inner.interface
                ));
            }
            Ok(())
        })
    }
}
