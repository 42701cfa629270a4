//! Fencing, seen from the wire: three nodes, a client and a sink in
//! network namespaces on one bridge; an observer on the bridge records
//! every ARP frame that claims the VIP while the client keeps asking who
//! has it. Whatever happens to the owner, no two MACs may answer for the
//! VIP at once (beyond the last reply already on its way: see
//! `common::wire::TOLERANCE`).
//!
//! - the owner frozen (SIGSTOP) and later thawed: its kernel keeps the
//!   address only until the lifetime tied to its lease runs out, the next
//!   owner claims it only once nobody answers for it, and the thawed node
//!   stops without announcing it again;
//! - the owner cut off from the other nodes while a client is in the
//!   middle of DATA: the address goes first, the session is cut, not
//!   waited for.
//!
//! Needs root: compiled in with MTAD_NETNS_TESTS=1 (set by .ci/run),
//! reported as ignored otherwise.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::daemon::Daemon;
use common::lab::{greeter, until_greeted_by, CLIENT, PATIENCE};
use common::netns::{node_config, Lab, NODES, VIP};
use common::wire::{self, Claim};
use mtad::resource::netlink::NetlinkVip;
use mtad::resource::Resource;

fn config(dir: &Path, name: &str, last: u8) -> PathBuf {
    let extra = "preferred_nodes = [\"n1\", \"n2\", \"n3\"]\nannounce_interval = \"2s\"";
    node_config(dir, name, last, extra, "info")
}

/// The lab with its three nodes up, n1 owning the VIP, the observer and
/// the prober running.
struct Fenced {
    lab: Lab,
    _dir: tempfile::TempDir,
    nodes: Vec<Daemon>,
    stop: Arc<AtomicBool>,
    recorder: std::thread::JoinHandle<Vec<Claim>>,
    prober: std::thread::JoinHandle<()>,
    rounds: Arc<AtomicU64>,
}

async fn up() -> Fenced {
    let dir = tempfile::tempdir().unwrap();
    let (lab, _received) = common::lab::with_sink(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let recorder = wire::record(&lab, VIP, stop.clone());
    let rounds = Arc::new(AtomicU64::new(0));
    let prober = wire::probe(&lab, "client", (CLIENT, VIP), rounds.clone(), stop.clone());
    let mut nodes = Vec::new();
    for (name, last) in NODES {
        let cfg = config(dir.path(), name, last);
        nodes.push(Daemon::start_in(&lab.exec(name), &cfg).await);
    }
    until_greeted_by(&lab, "n1");
    lab.until_voting("n2", 3);
    Fenced {
        lab,
        _dir: dir,
        nodes,
        stop,
        recorder,
        prober,
        rounds,
    }
}

impl Fenced {
    /// Until a node other than `old` greets on the VIP; its name.
    fn successor(&self, old: &str) -> String {
        let deadline = mtad::clock::instant() + PATIENCE;
        loop {
            if let Some(w) = greeter(&self.lab).filter(|w| !w.starts_with(old)) {
                return w.split('.').next().unwrap_or("").to_string();
            }
            assert!(
                mtad::clock::instant() < deadline,
                "nobody took the VIP from {old}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Once `node` has removed the VIP (by its log) and the client has
    /// asked who has it a few more times since.
    async fn until_let_go(&mut self, node: usize) {
        self.nodes[node]
            .wait_line(|l| l.contains("VIP removed"))
            .await;
        let since = self.rounds.load(Ordering::SeqCst);
        while self.rounds.load(Ordering::SeqCst) < since + 10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop observing; every frame that claimed the VIP, with no two MACs
    /// answering at once.
    async fn verdict(mut self, what: &str) -> Vec<Claim> {
        self.stop.store(true, Ordering::SeqCst);
        self.prober.join().unwrap();
        let rounds = self.rounds.load(Ordering::SeqCst);
        let claims = self.recorder.join().unwrap();
        let owners = wire::report(&claims);
        eprintln!("{what}: {rounds} probe rounds; answering: {owners:#?}");
        assert!(rounds > 50, "the prober ran only {rounds} rounds");
        let doubles = wire::doubles(&claims);
        assert!(
            doubles.is_empty(),
            "{what}: two MACs answered for the VIP at once: {doubles:#?}"
        );
        for n in &mut self.nodes {
            let _ = n.child.start_kill();
            let _ = n.child.wait().await;
        }
        claims
    }
}

#[test]
fn the_observer_tells_an_overlap_from_a_clean_handover() {
    let at = |ms: u64, mac: u8| Claim {
        at: Duration::from_millis(ms),
        mac: [mac; 6],
        announced: false,
    };
    let sorted = |mut v: Vec<Claim>| {
        v.sort_by_key(|c| c.at);
        v
    };
    let clean: Vec<Claim> = (0..10)
        .map(|i| at(i * 20, 1))
        .chain((12..20).map(|i| at(i * 20, 2)))
        .collect();
    assert!(wire::doubles(&clean).is_empty());
    // The old owner's last reply, on its way as the new owner begins.
    let mut late = clean.clone();
    late.push(at(245, 1));
    assert!(
        wire::doubles(&sorted(late)).is_empty(),
        "within the tolerance"
    );
    // The old owner answering 100 ms into its successor's stretch.
    let mut both = clean;
    both.push(at(340, 1));
    let d = wire::doubles(&sorted(both));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].into, Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn a_frozen_owner_never_answers_beside_its_successor() {
    let lab = up().await;
    let frozen_at = mtad::clock::instant();
    lab.nodes[0].signal(libc::SIGSTOP);
    let next = lab.successor("n1");
    eprintln!(
        "frozen owner: {next} greets on the VIP after {:?}",
        frozen_at.elapsed()
    );
    // Stay frozen a while (the fault itself), then thaw: n1 must stop
    // the group without claiming the VIP again.
    tokio::time::sleep_until((frozen_at + Duration::from_secs(5)).into()).await;
    let n1_mac = lab.lab.mac("n1");
    let thawed = mtad::clock::since_epoch();
    lab.nodes[0].signal(libc::SIGCONT);
    let mut lab = lab;
    lab.until_let_go(0).await;
    // Still the successor on the VIP, after n1 has acted.
    assert_eq!(lab.successor("n1"), next);
    let claims = lab.verdict("frozen owner").await;
    let after: Vec<_> = claims
        .iter()
        .filter(|c| c.at >= thawed && common::netns::mac_text(&c.mac) == n1_mac)
        .collect();
    assert!(
        after.is_empty(),
        "n1 claimed the VIP after it thawed: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn a_partitioned_owner_mid_data_lets_go_before_its_successor_claims() {
    let mut lab = up().await;
    // A client in the middle of DATA that then neither sends nor reads.
    let (mid_data, hold) = (mpsc::channel(), Arc::new(AtomicBool::new(false)));
    let (tx, held) = (mid_data.0, hold.clone());
    let session = lab.lab.within("client", move || {
        let mut s = TcpStream::connect(SocketAddr::from((VIP, 25))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        let mut expect = |code: &str| loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with(code), "{line}");
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        };
        expect("220");
        for (cmd, code) in [
            ("EHLO client.example\r\n", "250"),
            ("MAIL FROM:<a@example.test>\r\n", "250"),
            ("RCPT TO:<b@dest.example>\r\n", "250"),
            ("DATA\r\n", "354"),
        ] {
            s.write_all(cmd.as_bytes()).unwrap();
            expect(code);
        }
        s.write_all(b"Subject: half\r\n\r\nhalf a body").unwrap();
        tx.send(()).unwrap();
        while !held.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    mid_data.1.recv().unwrap();
    let cut = [("n2", "198.18.0.2"), ("n3", "198.18.0.3")];
    lab.lab.cut(("n1", "198.18.0.1"), &cut);
    let cut_at = mtad::clock::instant();
    let next = lab.successor("n1");
    eprintln!(
        "partitioned owner: {next} greets on the VIP after {:?}",
        cut_at.elapsed()
    );
    lab.until_let_go(0).await;
    lab.lab.heal(("n1", "198.18.0.1"), &cut);
    hold.store(true, Ordering::SeqCst);
    session.join().unwrap();
    lab.verdict("partitioned owner").await;
}

/// Whether host `name` has `ip` on its eth0, by the kernel's own account.
fn has(lab: &Lab, name: &str, ip: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-n", &lab.ns(name), "-o", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {ip}/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn the_kernel_drops_a_vip_whose_lease_is_no_longer_renewed() {
    let lab = Lab::new(&["h"], &[1]).unwrap_or_else(|e| panic!("lab: {e}"));
    for vip in ["198.18.0.100/24", "2001:db8::100/64"] {
        let ip = vip.split('/').next().unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        let holder = lab.within("h", move || {
            common::lab::block_on(async move {
                let net: ipnet::IpNet = vip.parse().unwrap();
                let p = NetlinkVip::new(net, "eth0".into(), Duration::from_secs(10));
                p.lease(tokio::time::Instant::now() + Duration::from_millis(600));
                p.start().await.unwrap();
                // Renewed as an owner renews: it stays.
                for _ in 0..12 {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    p.lease(tokio::time::Instant::now() + Duration::from_millis(600));
                }
                p.check().await.unwrap();
                // Then the process stops renewing (as if frozen) and keeps
                // the provider: only the kernel can take the address away.
                tx.send(()).unwrap();
                std::future::pending::<()>().await;
            })
        });
        rx.recv().unwrap();
        assert!(has(&lab, "h", ip), "{vip}: up while renewed");
        let since = mtad::clock::instant();
        while has(&lab, "h", ip) {
            assert!(since.elapsed() < PATIENCE, "{vip}: the kernel kept it");
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{vip}: gone {:?} after the last renewal", since.elapsed());
        drop(holder);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(netns_tests),
    ignore = "needs root: build and run with MTAD_NETNS_TESTS=1"
)]
async fn a_claim_finds_the_vip_held_by_another_host_until_it_is_gone() {
    let lab = Lab::new(&["h1", "h2"], &[1, 2]).unwrap_or_else(|e| panic!("lab: {e}"));
    for vip in ["198.18.0.100/24", "2001:db8::100/64"] {
        let net: ipnet::IpNet = vip.parse().unwrap();
        let provider = move || NetlinkVip::new(net, "eth0".into(), Duration::from_secs(10));
        let h1 = provider();
        let (up, held) = (h1.clone(), h1.clone());
        let claim = move |lab: &Lab| {
            let p = provider();
            lab.within("h2", move || common::lab::block_on(p.claim()))
                .join()
                .unwrap()
        };
        assert_eq!(claim(&lab), Ok(()), "{vip}: nobody holds it yet");
        lab.within("h1", move || {
            common::lab::block_on(async move {
                up.lease(tokio::time::Instant::now() + Duration::from_secs(30));
                up.start().await
            })
        })
        .join()
        .unwrap()
        .unwrap();
        let err = claim(&lab).unwrap_err();
        let mac = lab.mac("h1");
        assert!(err.contains(&mac), "{vip}: names the holder {mac}: {err}");
        // Its own host's claim is no conflict (a restart in place).
        lab.within("h1", move || common::lab::block_on(held.claim()))
            .join()
            .unwrap()
            .unwrap();
        lab.within("h1", move || common::lab::block_on(h1.stop()))
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(claim(&lab), Ok(()), "{vip}: free once removed");
    }
}
