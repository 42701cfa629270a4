//! What lives around the namespace lab's nodes: a mail sink on its own
//! host, and a client's view of the VIP (who greets on it, sending through
//! it, where its ARP entry points).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::netns::{Lab, NODES, SINK, VIP};

/// The lab's client host's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// How long a wait for the lab may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The three nodes' lab with a client and a sink host, the cluster secret
/// written into `dir`, and the sink running; what the sink receives.
pub fn with_sink(dir: &Path) -> (Lab, Received) {
    let names: Vec<&str> = NODES
        .iter()
        .map(|(n, _)| *n)
        .chain(["client", "sink"])
        .collect();
    let lab = Lab::new(&names, &[1, 2, 3, 10, 20]).unwrap_or_else(|e| panic!("lab: {e}"));
    std::fs::write(dir.join("cluster.key"), "namespace lab secret, long enough").unwrap();
    let received: Received = Arc::default();
    let r = received.clone();
    lab.within("sink", move || block_on(sink(r)));
    (lab, received)
}

/// What the sink received: (peer address, message text).
pub type Received = Arc<Mutex<Vec<(SocketAddr, String)>>>;

/// A minimal SMTP sink, run inside the sink namespace.
pub async fn sink(received: Received) {
    let listener = tokio::net::TcpListener::bind(SINK).await.unwrap();
    loop {
        let (stream, peer) = listener.accept().await.unwrap();
        let received = received.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            let _ = w.write_all(b"220 sink ESMTP\r\n").await;
            let (mut line, mut data, mut in_data) = (String::new(), String::new(), false);
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                let reply: &[u8] = if in_data {
                    if line == ".\r\n" {
                        in_data = false;
                        received
                            .lock()
                            .unwrap()
                            .push((peer, std::mem::take(&mut data)));
                        b"250 ok\r\n"
                    } else {
                        data.push_str(&line);
                        b""
                    }
                } else {
                    match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
                        "DATA" => {
                            in_data = true;
                            b"354 go on\r\n"
                        }
                        "QUIT" => b"221 bye\r\n",
                        _ => b"250 ok\r\n",
                    }
                };
                if !reply.is_empty() && w.write_all(reply).await.is_err() {
                    break;
                }
                line.clear();
            }
        });
    }
}

pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// From the client: who greets on the VIP's port 25, if anyone.
pub fn greeter(lab: &Lab) -> Option<String> {
    let vip = SocketAddr::from((VIP, 25));
    lab.within("client", move || {
        block_on(mtad::demo::greeter(vip, Duration::from_secs(3)))
    })
    .join()
    .unwrap()
}

pub fn until_greeted_by(lab: &Lab, want: &str) {
    let deadline = mtad::clock::instant() + PATIENCE;
    loop {
        if greeter(lab).is_some_and(|w| w.starts_with(want)) {
            return;
        }
        assert!(
            mtad::clock::instant() < deadline,
            "{want} never answered on the VIP"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// From the client: send one message through the VIP.
pub fn send(lab: &Lab, subject: &'static str) {
    send_to(lab, SocketAddr::from((VIP, 25)), subject)
}

pub fn send_to(lab: &Lab, to: SocketAddr, subject: &'static str) {
    send_sized(lab, to, subject, 0)
}

/// Send one message through `to` from the client, its body padded to
/// `size` bytes (0: small).
pub fn send_sized(lab: &Lab, to: SocketAddr, subject: &'static str, size: usize) {
    let reply = lab
        .within("client", move || {
            block_on(async move {
                let mut c = super::client::Client::connect(to).await.unwrap();
                let mut body = format!("Subject: {subject}\r\n\r\n");
                // Lines of 78 characters and CRLF, then the last one short
                // (the client ends it with the CRLF before the dot).
                while body.len() + 82 < size {
                    body.push_str(&"x".repeat(78));
                    body.push_str("\r\n");
                }
                let last = size.saturating_sub(body.len() + 2).max(1);
                body.push_str(&"x".repeat(last));
                c.send("a@example.test", &["b@dest.example"], &body)
                    .await
                    .unwrap()
            })
        })
        .join()
        .unwrap();
    assert!(reply.starts_with("250"), "{reply}");
}

pub fn arrived(received: &Received, subject: &str) -> SocketAddr {
    let deadline = mtad::clock::instant() + PATIENCE;
    loop {
        let got = received.lock().unwrap().clone();
        if let Some((peer, text)) = got.iter().find(|(_, t)| t.contains(subject)) {
            let head = text.lines().take(40).collect::<Vec<_>>().join("\n");
            assert!(
                !text.contains("delivery-status"),
                "{subject} bounced:\n{head}"
            );
            return *peer;
        }
        assert!(
            mtad::clock::instant() < deadline,
            "{subject} never reached the sink"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What systemd's ExecStopPost does after the daemon died.
pub async fn release(lab: &Lab, name: &str, cfg: &Path) {
    let mut argv = lab.exec(name);
    argv.push(env!("CARGO_BIN_EXE_mtad").into());
    let out = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .args(["release", "--config"])
        .arg(cfg)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The client's view of the VIP's MAC once it matches `want`.
pub fn arp_points_to(lab: &Lab, want: &str) {
    let deadline = mtad::clock::instant() + PATIENCE;
    loop {
        let now = lab.neighbour("client", &VIP.to_string());
        if now.as_deref() == Some(want) {
            return;
        }
        assert!(
            mtad::clock::instant() < deadline,
            "the client's ARP entry for the VIP is {now:?}, not {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
