//! The netlink VIP provider: add the address to an interface with
//! rtnetlink, announce it (gratuitous ARP / unsolicited neighbour
//! advertisement, three times, spaced, then again every announce
//! interval so stale caches heal), and remove it on stop. The health check
//! looks the address up on the interface.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::Handle;
use tokio::task::JoinHandle;

use super::announce::{self, Mac};
use super::{OpFuture, Resource};

/// Announcements right after the address is added, this far apart.
const FIRST_ANNOUNCEMENTS: u32 = 3;
const ANNOUNCE_SPACING: Duration = Duration::from_millis(200);

/// A VIP this node adds to an interface itself.
#[derive(Clone)]
pub struct NetlinkVip {
    inner: Arc<Inner>,
}

struct Inner {
    vip: IpNet,
    interface: String,
    announce_every: Duration,
    announcer: Mutex<Option<JoinHandle<()>>>,
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
                announcer: Mutex::new(None),
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

impl Inner {
    fn stop_announcing(&self) {
        if let Some(t) = self
            .announcer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

impl Resource for NetlinkVip {
    fn name(&self) -> String {
        format!("vip {} on {}", self.inner.vip, self.inner.interface)
    }

    fn start(&self) -> OpFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let handle = connect()?;
            let (index, mac) = link(&handle, &inner.interface).await?;
            let ip = inner.vip.addr();
            let mut add = handle
                .address()
                .add(index, ip, inner.vip.prefix_len())
                .replace();
            if ip.is_ipv6() {
                // No duplicate address detection: the lease already proves
                // nobody else holds it, and a tentative address could not
                // be bound (outbound mail from it would fail meanwhile).
                add.message_mut().header.flags |= AddressHeaderFlags::Nodad;
            }
            add.execute()
                .await
                .map_err(|e| format!("adding {} to {}: {e}", inner.vip, inner.interface))?;
            tracing::info!(vip = %inner.vip, interface = %inner.interface, "VIP added");
            let Some(mac) = mac else {
                return Ok(()); // a link without a MAC has no neighbours to tell
            };
            announce_once(index, mac, ip);
            let every = inner.announce_every;
            let task = tokio::spawn(async move {
                for _ in 1..FIRST_ANNOUNCEMENTS {
                    tokio::time::sleep(ANNOUNCE_SPACING).await;
                    announce_once(index, mac, ip);
                }
                loop {
                    tokio::time::sleep(every).await;
                    announce_once(index, mac, ip);
                }
            });
            inner.stop_announcing();
            *inner.announcer.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
            Ok(())
        })
    }

    fn stop(&self, _graceful: bool) -> OpFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner.stop_announcing();
            let handle = connect()?;
            let (index, _) = link(&handle, &inner.interface).await?;
            for msg in find(&handle, index, inner.vip.addr()).await? {
                handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|e| format!("removing {}: {e}", inner.vip))?;
            }
            tracing::info!(vip = %inner.vip, interface = %inner.interface, "VIP removed");
            Ok(())
        })
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
