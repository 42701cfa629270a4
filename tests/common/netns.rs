//! A small lab of network namespaces on one bridge, for VIP tests that
//! need real interfaces, ARP and routing. Every host is a namespace with
//! an `eth0` (a veth whose other end is on a bridge in a "switch"
//! namespace) and an address in 198.18.0.0/24. The lab removes every
//! namespace it made when dropped.
//!
//! These tests need root. They are compiled in when `MTAD_NETNS_TESTS=1`
//! at build time (which `.ci/run` sets; see build.rs) and then a lab that
//! cannot be built fails the test; otherwise they report as ignored.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

/// The lab's three mtad nodes (name, last octet of their address).
pub const NODES: [(&str, u8); 3] = [("n1", 1), ("n2", 2), ("n3", 3)];
/// The group's VIP on the lab's bridge.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// Where the nodes relay to (a sink in its own namespace).
pub const SINK: &str = "198.18.0.20:2526";
/// The lab nodes' `max_message_size`, in bytes.
pub const MAX_MESSAGE: usize = 65_536;

/// Write node `name`'s config (address 198.18.0.`last`) into `dir`: a
/// member of the lab cluster with one netlink VIP group on eth0, relaying
/// everything to SINK. `group_extra` adds lines to the `[[group]]`.
pub fn node_config(
    dir: &std::path::Path,
    name: &str,
    last: u8,
    group_extra: &str,
    level: &str,
) -> std::path::PathBuf {
    let seeds: Vec<String> = NODES
        .iter()
        .map(|(_, l)| format!("\"198.18.0.{l}:7400\""))
        .collect();
    let text = format!(
        r#"
[node]
name = "{name}"
data_dir = "{data}"

[smtp]
listen = ["198.18.0.{last}:2525"]
hostname = "{name}.example.test"
relay_networks = ["198.18.0.0/15"]
max_message_size = "{MAX_MESSAGE}"

[delivery]
retry = ["1s"]

[[route]]
domains = ["*"]
next_hops = ["{SINK}"]

[cluster]
name = "lab"
listen = "198.18.0.{last}:7400"
seeds = [{seeds}]
secret_file = "{key}"

[[group]]
name = "mta"
vip = "{VIP}/24"
provider = "netlink"
interface = "eth0"
{group_extra}

[admin]
listen = "127.0.0.1:8025"

[log]
format = "json"
level = "{level}"
"#,
        data = dir.join(name).display(),
        seeds = seeds.join(", "),
        key = dir.join("cluster.key").display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lab.
pub struct Lab {
    prefix: String,
    hosts: Vec<String>,
}

impl Lab {
    /// Hosts `names[i]` at 198.18.0.`addrs[i]`/24 on one bridge.
    pub fn new(names: &[&str], addrs: &[u8]) -> Result<Lab, String> {
        // Short and unique: interface names are at most 15 bytes.
        // Unique per lab, so labs of parallel tests never share a name;
        // short, since veth names end at 15 bytes.
        static LABS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 26;
        let prefix = format!("mt{}{}", std::process::id() % 100_000, (b'a' + n) as char);
        let mut lab = Lab {
            prefix,
            hosts: Vec::new(),
        };
        let sw = lab.ns("sw");
        run(&["ip", "netns", "add", &sw])?;
        lab.hosts.push("sw".into());
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for (i, (name, last)) in names.iter().zip(addrs).enumerate() {
            let ns = lab.ns(name);
            run(&["ip", "netns", "add", &ns])?;
            lab.hosts.push(name.to_string());
            // Link-local IPv6 addresses usable at once, not after a second
            // of duplicate address detection on a link just made.
            for knob in ["all", "default"] {
                let key = format!("net.ipv6.conf.{knob}.accept_dad=0");
                run(&["ip", "netns", "exec", &ns, "sysctl", "-qw", &key])?;
            }
            let port = format!("{}p{i}", lab.prefix);
            run(&[
                "ip", "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0"])?;
            run(&["ip", "-n", &sw, "link", "set", &port, "up"])?;
            let addr = format!("198.18.0.{last}/24");
            run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// The namespace name of host `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// `ip netns exec <ns>`: the prefix for a command run on host `name`.
    pub fn exec(&self, name: &str) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns(name)]
    }

    /// `mtad ARGS…` run on host `name`.
    pub fn mtad(&self, name: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(name), env!("CARGO_BIN_EXE_mtad")])
            .args(args)
            .output()
            .unwrap()
    }

    /// `mtad ctl --json nodes` run on host `name` (empty while it does not
    /// answer).
    pub fn nodes(&self, name: &str) -> Vec<serde_json::Value> {
        let out = self.mtad(name, &["ctl", "--json", "nodes"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Until host `name` sees `n` members, all up and voting (why: see
    /// `daemon::all_voting`). Another process: polled.
    pub fn until_voting(&self, name: &str, n: usize) {
        let deadline = mtad::clock::instant() + Duration::from_secs(60);
        loop {
            let rows = self.nodes(name);
            let ok = rows.len() == n
                && rows
                    .iter()
                    .all(|r| r["state"] == "up" && r["vote"] == "voter");
            if ok {
                return;
            }
            assert!(
                mtad::clock::instant() < deadline,
                "the cluster never settled: {rows:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The MAC of host `name`'s eth0.
    pub fn mac(&self, name: &str) -> String {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.ns(name),
            "cat",
            "/sys/class/net/eth0/address",
        ])
        .unwrap()
        .trim()
        .to_string()
    }

    /// The MAC host `name` has in its neighbour table for `ip`, if any.
    pub fn neighbour(&self, name: &str, ip: &str) -> Option<String> {
        let out = run(&["ip", "-n", &self.ns(name), "neigh", "show", ip]).ok()?;
        let words: Vec<&str> = out.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "lladdr")?;
        words.get(at + 1).map(|s| s.to_string())
    }

    /// Drop everything between `a` and the hosts `others` (both ways),
    /// leaving its other traffic alone.
    pub fn cut(&self, a: (&str, &str), others: &[(&str, &str)]) {
        for (name, ip) in others {
            let (ns_a, ns_o) = (self.ns(a.0), self.ns(name));
            let to_o = format!("{ip}/32");
            let to_a = format!("{}/32", a.1);
            run(&["ip", "-n", &ns_a, "route", "add", "blackhole", &to_o]).unwrap();
            run(&["ip", "-n", &ns_o, "route", "add", "blackhole", &to_a]).unwrap();
        }
    }

    /// Undo every `cut`.
    pub fn heal(&self, a: (&str, &str), others: &[(&str, &str)]) {
        for (name, ip) in others {
            let (ns_a, ns_o) = (self.ns(a.0), self.ns(name));
            let _ = run(&[
                "ip",
                "-n",
                &ns_a,
                "route",
                "del",
                "blackhole",
                &format!("{ip}/32"),
            ]);
            let _ = run(&[
                "ip",
                "-n",
                &ns_o,
                "route",
                "del",
                "blackhole",
                &format!("{}/32", a.1),
            ]);
        }
    }

    /// Run `f` on a thread inside host `name`'s namespace: sockets it
    /// opens live there.
    pub fn within<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns(name));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a namespace file we hold open, for this
            // thread only.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in self.hosts.iter().rev() {
            let _ = run(&["ip", "netns", "del", &self.ns(h)]);
        }
    }
}

/// What one `who_has` round heard about an address.
#[derive(Default)]
pub struct Heard {
    /// MACs that answered the question.
    pub answers: BTreeSet<[u8; 6]>,
    /// MACs that announced the address unasked (gratuitous ARP).
    pub announced: BTreeSet<[u8; 6]>,
}

/// Ask, on this thread's namespace's eth0, who has `ip`; what was heard
/// about it within `wait`. Run it inside a namespace (`Lab::within`).
pub fn who_has(me: Ipv4Addr, ip: Ipv4Addr, wait: Duration) -> Heard {
    const ETH_P_ARP: u16 = 0x0806;
    let proto = ETH_P_ARP.to_be();
    // SAFETY: plain socket calls with checked results and valid buffers.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let name = std::ffi::CString::new("eth0").unwrap();
        let index = libc::if_nametoindex(name.as_ptr());
        // The MAC from the kernel, not /sys: /sys follows the mount
        // namespace, which setns(CLONE_NEWNET) does not change.
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(b"eth0") {
            *d = *s as libc::c_char;
        }
        let r = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        assert_eq!(r, 0, "SIOCGIFHWADDR: {}", std::io::Error::last_os_error());
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(req.ifr_ifru.ifru_hwaddr.sa_data) {
            *d = s as u8;
        }
        let mut f = [0u8; 42];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&mac);
        f[28..32].copy_from_slice(&me.octets());
        f[38..42].copy_from_slice(&ip.octets());
        let mut to: libc::sockaddr_ll = std::mem::zeroed();
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = proto;
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 5_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        libc::sendto(
            fd,
            f.as_ptr().cast(),
            f.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let mut heard = Heard::default();
        let end = mtad::clock::instant() + wait;
        let mut buf = [0u8; 128];
        while mtad::clock::instant() < end {
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 42 || buf[28..32] != ip.octets() {
                continue;
            }
            let mut sha = [0u8; 6];
            sha.copy_from_slice(&buf[22..28]);
            // An ARP reply (oper 2) from `ip`; or a request from `ip` for
            // itself: an announcement.
            if buf[20..22] == [0, 2] {
                heard.answers.insert(sha);
            } else if buf[20..22] == [0, 1] && buf[38..42] == ip.octets() {
                heard.announced.insert(sha);
            }
        }
        libc::close(fd);
        heard
    }
}

/// "aa:bb:..." for a MAC.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
