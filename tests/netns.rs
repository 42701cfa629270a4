//! The VIP on real interfaces: three nodes, a client and a mail sink, each
//! in its own network namespace on one bridge, the netlink provider adding
//! the VIP to eth0 and announcing it by gratuitous ARP.
//!
//! - the owner serves SMTP on the VIP; mail it relays reaches the sink
//!   from the VIP's address;
//! - SIGKILL the owner: the client reaches SMTP on the VIP through the new
//!   owner, and its ARP entry points to the new owner's MAC, which it
//!   heard announce the VIP by gratuitous ARP;
//! - cut the owner off from the other nodes but not from the client: it
//!   drops the VIP before another node takes it;
//! - throughout, the client asks who has the VIP, again and again, and no
//!   answer round ever comes from two MACs.
//!
//! Needs root: runs when MTAD_NETNS_TESTS=1 (set by .ci/run), and then
//! fails if the namespaces cannot be made.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::Daemon;
use common::lab::{
    arp_points_to, arrived, block_on, greeter, release, send, send_sized, send_to,
    until_greeted_by, CLIENT, PATIENCE,
};
use common::netns::{mac_text, node_config, who_has, Lab, MAX_MESSAGE, NODES, VIP};

fn config(dir: &Path, name: &str, last: u8) -> PathBuf {
    let extra = "preferred_nodes = [\"n1\", \"n2\", \"n3\"]\nannounce_interval = \"2s\"";
    node_config(dir, name, last, extra, "info")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn the_vip_moves_between_namespaces_and_never_answers_from_two_macs() {
    let dir = tempfile::tempdir().unwrap();
    let (lab, received) = common::lab::with_sink(dir.path());
    // The client keeps asking who has the VIP; a round with two answers
    // would mean two owners at once.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        lab.within("client", move || {
            let (mut rounds, mut doubles) = (0u64, Vec::new());
            let mut announced = std::collections::BTreeSet::new();
            while !stop.load(Ordering::SeqCst) {
                let heard = who_has(CLIENT, VIP, Duration::from_millis(20));
                rounds += 1;
                if heard.answers.len() > 1 {
                    doubles.push(heard.answers.iter().map(mac_text).collect::<Vec<_>>());
                }
                announced.extend(heard.announced.iter().map(mac_text));
            }
            (rounds, doubles, announced)
        })
    };

    let mut nodes = Vec::new();
    for (name, last) in NODES {
        let cfg = config(dir.path(), name, last);
        nodes.push(Daemon::start_in(&lab.exec(name), &cfg).await);
    }
    until_greeted_by(&lab, "n1");
    send(&lab, "relayed from the VIP");
    let peer = arrived(&received, "relayed from the VIP");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(VIP),
        "outbound from the VIP"
    );
    // Mail a node that owns nothing accepts on its own address is handed
    // to the owner and leaves from the VIP too.
    send_to(&lab, "198.18.0.3:2525".parse().unwrap(), "handed over");
    assert_eq!(
        arrived(&received, "handed over").ip(),
        std::net::IpAddr::V4(VIP),
        "never from a node address"
    );
    // A message at the size limit, accepted by n3: handed over with n3's
    // Received header on top, it must not bounce at the owner's limit.
    send_sized(
        &lab,
        "198.18.0.3:2525".parse().unwrap(),
        "at the limit",
        MAX_MESSAGE,
    );
    arrived(&received, "at the limit");

    // SIGKILL the owner: n2 takes over, and the client's ARP entry follows.
    // The kernel keeps the address a killed process added; under systemd,
    // ExecStopPost runs `mtad release` at once — done here by hand.
    lab.until_voting("n2", 3);
    nodes[0].child.start_kill().unwrap();
    nodes[0].child.wait().await.unwrap();
    release(&lab, "n1", &config(dir.path(), "n1", 1)).await;
    until_greeted_by(&lab, "n2");
    arp_points_to(&lab, &lab.mac("n2"));
    send(&lab, "after the kill");
    assert_eq!(
        arrived(&received, "after the kill").ip(),
        std::net::IpAddr::V4(VIP)
    );
    // n1 returns (no failback): a majority without n2 exists again.
    nodes[0] = Daemon::start_in(&lab.exec("n1"), &config(dir.path(), "n1", 1)).await;
    nodes[0]
        .wait_line(|l| l.contains("joined the cluster"))
        .await;
    lab.until_voting("n3", 3);

    // Cut n2 off from n1 and n3, not from the client: n2 must let the VIP
    // go before n3 (preferred over... n1 returned, so either) takes it.
    let cut = [("n1", "198.18.0.1"), ("n3", "198.18.0.3")];
    lab.cut(("n2", "198.18.0.2"), &cut);
    let deadline = mtad::clock::instant() + PATIENCE;
    let new_owner = loop {
        match greeter(&lab) {
            Some(w) if !w.starts_with("n2") => break w,
            _ => {}
        }
        assert!(
            mtad::clock::instant() < deadline,
            "nobody took the VIP from the cut-off n2"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let owner = new_owner.split('.').next().unwrap().to_string();
    arp_points_to(&lab, &lab.mac(&owner));
    lab.heal(("n2", "198.18.0.2"), &cut);

    stop.store(true, Ordering::SeqCst);
    let (rounds, doubles, announced) = prober.join().unwrap();
    assert!(rounds > 50, "the prober ran only {rounds} rounds");
    assert!(
        doubles.is_empty(),
        "two MACs answered for the VIP: {doubles:?}"
    );
    // The client's ARP entry could follow its own questions; each new
    // owner must also have announced the VIP unasked.
    for owner in ["n2", owner.as_str()] {
        let mac = lab.mac(owner);
        assert!(
            announced.contains(&mac),
            "{owner} ({mac}) never announced the VIP: {announced:?}"
        );
    }
    for mut n in nodes {
        let _ = n.child.start_kill();
        let _ = n.child.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn the_netlink_provider_adds_vips_ready_to_use_and_removes_them() {
    use mtad::resource::netlink::NetlinkVip;
    use mtad::resource::Resource;
    let lab = Lab::new(&["h"], &[1]).unwrap_or_else(|e| panic!("lab: {e}"));
    for vip in ["198.18.0.100/24", "2001:db8::100/64"] {
        let done = lab.within("h", move || {
            block_on(async move {
                let net: ipnet::IpNet = vip.parse().unwrap();
                let p = NetlinkVip::new(net, "eth0".into(), Duration::from_secs(10));
                assert!(p.check().await.is_err(), "{vip}: not there yet");
                let err = p.start().await.unwrap_err();
                assert!(err.contains("no lease"), "{vip}: {err}");
                p.lease(tokio::time::Instant::now() + Duration::from_secs(10));
                p.start().await.unwrap();
                p.check().await.unwrap();
                // Usable at once — an IPv6 address still in duplicate
                // address detection could not be bound.
                let bound = std::net::TcpListener::bind((net.addr(), 0));
                assert!(bound.is_ok(), "{vip}: {bound:?}");
                drop(bound);
                p.stop().await.unwrap();
                assert!(p.check().await.is_err(), "{vip}: removed");
                std::net::TcpListener::bind((net.addr(), 0)).is_err()
            })
        });
        assert!(done.join().unwrap(), "{vip}: no longer bindable");
    }
}
