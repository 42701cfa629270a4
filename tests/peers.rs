//! The node against SMTP programs nobody here wrote: swaks, Python's
//! smtplib, Postfix's smtp-source as clients and smtp-sink as next hop.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use common::daemon::free_port;
use common::node::{config, eml_files, start, start_on, wait_for};
use tokio::process::Command;

/// Run a peer program to completion; returns (exit success, all output).
async fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} must be installed (scripts/test.sh does it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn swaks(server: SocketAddr, extra: &[&str]) -> (bool, String) {
    let server = server.to_string();
    let mut args = vec!["--server", server.as_str(), "--helo", "client.example.test"];
    args.extend_from_slice(extra);
    run("swaks", &args).await
}

/// A running smtp-sink that dumps every message into a directory.
struct Sink {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: tokio::process::Child,
}

impl Sink {
    /// Start smtp-sink and wait until it accepts connections.
    async fn start() -> Sink {
        let dir = tempfile::tempdir().unwrap();
        // smtp-sink drops to "nobody" when run as root; let it write.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let addr = free_port();
        let mut cmd = Command::new(sink_path());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .arg("-d")
            .arg(format!("{}/%M.", dir.path().display()))
            .arg(addr.to_string())
            .arg("256")
            .kill_on_drop(true)
            .spawn()
            .expect("smtp-sink (Debian package postfix) must be installed");
        let sink = Sink { addr, dir, child };
        wait_listening(addr).await;
        sink
    }

    /// A catch-all route to this sink.
    fn route(&self) -> String {
        format!(
            "[[route]]\ndomains = [\"*\"]\nnext_hops = [\"{}\"]\ntls = \"none\"\n",
            self.addr
        )
    }

    fn messages(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn sink_path() -> &'static str {
    if std::path::Path::new("/usr/sbin/smtp-sink").exists() {
        "/usr/sbin/smtp-sink"
    } else {
        "smtp-sink"
    }
}

/// Wait until smtp-sink accepts connections, so the node's first attempt
/// does not race its start. smtp-sink gives no readiness signal to await,
/// so this polls, bounded.
async fn wait_listening(addr: SocketAddr) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{addr} never started listening");
}

fn drop_route(dir: &std::path::Path) -> String {
    format!(
        "[[route]]\ndomains = [\"*\"]\ndrop_dir = \"{}\"\n",
        dir.join("outbox").display()
    )
}

#[tokio::test]
async fn swaks_mail_lands_in_the_drop_directory() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path(), "", &drop_route(dir.path()))).await;
    let (ok, out) = swaks(
        node.smtp_addrs()[0],
        &[
            "--from",
            "alice@example.test",
            "--to",
            "bob@example.test",
            "--header",
            "Subject: via swaks",
            "--body",
            "hello from swaks",
        ],
    )
    .await;
    assert!(ok, "swaks failed:\n{out}");
    assert!(out.contains("250 2.0.0"), "{out}");
    wait_for(&node, "one delivery", |s| s.delivered == 1).await;
    let files = eml_files(&dir.path().join("outbox"));
    assert_eq!(files.len(), 1);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(
        text.starts_with("Return-Path: <alice@example.test>\r\n"),
        "{text}"
    );
    assert!(text.contains("X-Mtad-Rcpt-To: <bob@example.test>\r\n"));
    assert!(text.contains("Received: from client.example.test ([127.0.0.1])"));
    assert!(text.contains("Subject: via swaks"));
    assert!(text.contains("hello from swaks"));
}

#[tokio::test]
async fn smtplib_mail_is_relayed_to_smtp_sink() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let node = start(config(dir.path(), "", &sink.route())).await;
    let addr = node.smtp_addrs()[0];
    let script = format!(
        r#"
import smtplib
from email.message import EmailMessage
with smtplib.SMTP("{ip}", {port}) as s:
    s.ehlo("py.example.test")
    assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("size")
    for i in range(20):
        m = EmailMessage()
        m["From"] = "py@example.test"
        m["To"] = "sink@dest.example"
        m["Subject"] = "smtplib %d" % i
        m.set_content("message %d\n.leading dot line\n" % i)
        s.send_message(m)
print("sent")
"#,
        ip = addr.ip(),
        port = addr.port()
    );
    let (ok, out) = run("python3", &["-c", &script]).await;
    assert!(ok, "smtplib failed:\n{out}");
    wait_for(&node, "20 deliveries", |s| s.delivered == 20).await;
    let got = sink.messages();
    assert_eq!(got.len(), 20, "smtp-sink holds {} messages", got.len());
    for i in 0..20 {
        let subject = format!("Subject: smtplib {i}\n");
        let m = got
            .iter()
            .find(|m| m.contains(&subject))
            .unwrap_or_else(|| panic!("message {i} missing"));
        // Dot-stuffing survived both hops.
        assert!(m.contains("\n.leading dot line"), "{m}");
    }
}

#[tokio::test]
async fn smtp_source_load_is_relayed_to_smtp_sink() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let node = start(config(dir.path(), "", &sink.route())).await;
    let addr = node.smtp_addrs()[0].to_string();
    let source = if std::path::Path::new("/usr/sbin/smtp-source").exists() {
        "/usr/sbin/smtp-source"
    } else {
        "smtp-source"
    };
    // 10 parallel sessions, 300 messages of 4 KiB.
    let (ok, out) = run(
        source,
        &[
            "-s",
            "10",
            "-m",
            "300",
            "-l",
            "4096",
            "-f",
            "load@example.test",
            "-t",
            "sink@dest.example",
            &addr,
        ],
    )
    .await;
    assert!(ok, "smtp-source failed:\n{out}");
    let s = wait_for(&node, "300 deliveries", |s| s.delivered == 300).await;
    assert_eq!(s.bounced, 0);
    assert_eq!(sink.messages().len(), 300);
}

#[tokio::test]
async fn outsiders_cannot_relay_but_may_send_to_accepted_domains() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = "relay_networks = [\"192.0.2.0/24\"]\naccept_domains = [\"example.test\"]";
    let node = start(config(dir.path(), smtp, &drop_route(dir.path()))).await;
    let addr = node.smtp_addrs()[0];
    let (ok, out) = swaks(
        addr,
        &[
            "--from",
            "x@elsewhere.example",
            "--to",
            "victim@elsewhere.example",
        ],
    )
    .await;
    assert!(!ok, "relay was allowed:\n{out}");
    assert!(out.contains("554 5.7.1"), "{out}");
    let (ok, out) = swaks(
        addr,
        &["--from", "x@elsewhere.example", "--to", "user@example.test"],
    )
    .await;
    assert!(ok, "local delivery refused:\n{out}");
    wait_for(&node, "the local delivery", |s| s.delivered == 1).await;
}

#[tokio::test]
async fn an_oversized_message_gets_552_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(
        dir.path(),
        "max_message_size = \"2KiB\"",
        &drop_route(dir.path()),
    ))
    .await;
    let addr = node.smtp_addrs()[0];
    let big = "x".repeat(4096);
    let (ok, out) = swaks(
        addr,
        &[
            "--from",
            "a@example.test",
            "--to",
            "b@example.test",
            "--body",
            &big,
        ],
    )
    .await;
    assert!(!ok, "oversized message accepted:\n{out}");
    assert!(out.contains("552 5.3.4"), "{out}");
    assert!(out.contains("SIZE 2048"), "SIZE not announced:\n{out}");
    let (ok, out) = swaks(
        addr,
        &[
            "--from",
            "a@example.test",
            "--to",
            "b@example.test",
            "--body",
            "small",
        ],
    )
    .await;
    assert!(ok, "{out}");
}

#[tokio::test]
async fn a_spool_failure_gets_451_and_nothing_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let spool = mtad::spool::MemorySpool::new();
    spool.fail_fsync(true);
    let node = start_on(
        config(dir.path(), "", &drop_route(dir.path())),
        std::sync::Arc::new(spool.clone()),
    )
    .await;
    let addr = node.smtp_addrs()[0];
    let (ok, out) = swaks(
        addr,
        &["--from", "a@example.test", "--to", "b@example.test"],
    )
    .await;
    assert!(!ok, "acknowledged without a durable copy:\n{out}");
    assert!(out.contains("451 4.3.0"), "{out}");
    assert!(!out.contains("250 2.0.0 Ok: queued"), "{out}");
    assert!(spool.envelopes().is_empty());
    spool.set_full(true);
    spool.fail_fsync(false);
    let (ok, out) = swaks(
        addr,
        &["--from", "a@example.test", "--to", "b@example.test"],
    )
    .await;
    assert!(!ok && out.contains("452 4.3.1"), "{out}");
    spool.set_full(false);
    let (ok, out) = swaks(
        addr,
        &["--from", "a@example.test", "--to", "b@example.test"],
    )
    .await;
    assert!(ok, "{out}");
    wait_for(&node, "delivery after recovery", |s| s.delivered == 1).await;
}
