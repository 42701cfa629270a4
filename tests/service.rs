//! mtad as a service: systemd notifications in order (READY only once it
//! serves, WATCHDOG while alive, RELOADING then READY on SIGHUP, STOPPING
//! on SIGTERM), and reloads under load — a good file applies to new
//! sessions while open ones go on, a bad or restart-only one changes
//! nothing and says why, and no acknowledged message is lost.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::client::Client;
use common::daemon::{ctl, free_port, Daemon};
use tokio::net::UnixDatagram;

fn config_text(dir: &Path, smtp: SocketAddr, admin: SocketAddr, rcpts: &str) -> String {
    format!(
        r#"
[node]
name = "svc"
data_dir = "{data}"

[smtp]
listen = ["{smtp}"]
hostname = "svc.example.test"
relay_networks = ["127.0.0.0/8"]
{rcpts}

[[route]]
domains = ["*"]
drop_dir = "{data}/outbox"

[admin]
listen = "{admin}"

[log]
format = "json"
level = "info"
"#,
        data = dir.join("data").display()
    )
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("svc.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn next(sock: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(common::node::PATIENCE, sock.recv(&mut buf))
        .await
        .expect("a notification in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
}

/// The next notification that is not a watchdog ping; counts the pings.
async fn next_state(sock: &UnixDatagram, pings: &mut usize) -> String {
    loop {
        let m = next(sock).await;
        if m == "WATCHDOG=1" {
            *pings += 1;
        } else {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_reloading_and_stopping_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, admin) = (free_port(), free_port());
    let config = write(dir.path(), &config_text(dir.path(), smtp, admin, ""));
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let env = [
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
    ];
    let mut daemon = Daemon::start_with(&[], &config, &env).await;
    let mut pings = 0;
    let ready = next_state(&sock, &mut pings).await;
    assert!(ready.starts_with("READY=1"), "{ready}");
    // READY came only once the node serves: SMTP answers at once.
    Client::connect(smtp).await.expect("serving once READY");
    // Watchdog pings every 100 ms while alive.
    while pings < 3 {
        next_state_or_ping(&sock, &mut pings).await;
    }
    daemon.signal(libc::SIGHUP);
    let reloading = next_state(&sock, &mut pings).await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert!(next_state(&sock, &mut pings).await.starts_with("READY=1"));
    daemon.signal(libc::SIGTERM);
    let stopping = next_state(&sock, &mut pings).await;
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
    let status = daemon.child.wait().await.unwrap();
    assert!(status.success(), "{status}");
}

async fn next_state_or_ping(sock: &UnixDatagram, pings: &mut usize) {
    let m = next(sock).await;
    assert_eq!(m, "WATCHDOG=1", "only pings between READY and a signal");
    *pings += 1;
}

/// RCPT replies for `n` recipients in a new transaction on `c`.
async fn rcpts(c: &mut Client, n: usize) -> Vec<String> {
    assert!(c
        .command("MAIL FROM:<s@b.example>\r\n")
        .await
        .unwrap()
        .starts_with("250"));
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            c.command(&format!("RCPT TO:<u{i}@a.example>\r\n"))
                .await
                .unwrap(),
        );
    }
    c.command("RSET\r\n").await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_apply_to_new_sessions_and_bad_files_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, admin) = (free_port(), free_port());
    let config = write(dir.path(), &config_text(dir.path(), smtp, admin, ""));
    let mut daemon = Daemon::start(&config).await;

    // Load: a client keeps sending while the reloads happen.
    let sender = tokio::spawn(async move {
        let mut c = Client::connect(smtp).await.unwrap();
        let mut acked = 0;
        for i in 0..200 {
            let body = format!("Subject: load {i}\r\n\r\nx\r\n");
            let r = c
                .send("s@b.example", &["u@a.example"], &body)
                .await
                .unwrap();
            assert!(r.starts_with("250"), "message {i}: {r}");
            acked += 1;
            tokio::task::yield_now().await;
        }
        acked
    });
    let mut old = Client::connect(smtp).await.unwrap();

    // A good file: at most 2 recipients from now on, and debug logs.
    let good = config_text(dir.path(), smtp, admin, "max_recipients = 2")
        .replace("level = \"info\"", "level = \"debug\"");
    write(dir.path(), &good);
    let (ok, text) = ctl(admin, &["reload"]).await;
    assert!(ok && text.contains("smtp, log changed"), "{text}");
    let mut new = Client::connect(smtp).await.unwrap();
    daemon.wait_line(|l| l.contains("smtp connect")).await;
    let replies = rcpts(&mut new, 3).await;
    assert!(
        replies[1].starts_with("250") && replies[2].starts_with("452"),
        "{replies:?}"
    );
    // The session opened before goes on as it began.
    assert!(rcpts(&mut old, 3)
        .await
        .iter()
        .all(|r| r.starts_with("250")));

    // A bad file: every error with line and field; nothing changes.
    let bad = config_text(
        dir.path(),
        smtp,
        admin,
        "max_recipients = \"many\"\nmax_message_size = -1",
    );
    write(dir.path(), &bad);
    let (ok, text) = ctl(admin, &["reload"]).await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("smtp.max_recipients") && text.contains("smtp.max_message_size"),
        "{text}"
    );
    assert!(text.contains("svc.toml:"), "file and line: {text}");
    let mut after = Client::connect(smtp).await.unwrap();
    assert!(
        rcpts(&mut after, 3).await[2].starts_with("452"),
        "the good reload still holds"
    );

    // What needs a restart keeps its running value, said with file, line
    // and field; the rest of the file applies.
    let renamed = config_text(dir.path(), smtp, admin, "max_recipients = 4")
        .replace("name = \"svc\"", "name = \"other\"");
    write(dir.path(), &renamed);
    let (ok, text) = ctl(admin, &["reload"]).await;
    assert!(ok, "{text}");
    assert!(text.starts_with("reloaded: smtp"), "{text}");
    let line = renamed
        .lines()
        .position(|l| l.contains("\"other\""))
        .unwrap()
        + 1;
    assert!(
        text.contains(&format!(
            "svc.toml:{line}:8: node.name: changed, but only a restart"
        )),
        "{text}"
    );
    let mut after = Client::connect(smtp).await.unwrap();
    assert!(
        rcpts(&mut after, 5).await[4].starts_with("452"),
        "max_recipients = 4 applies"
    );

    // Nothing dropped, nothing lost.
    let acked = sender.await.unwrap();
    assert_eq!(acked, 200);
    let outbox = dir.path().join("data/outbox");
    common::node::files_arrive(&outbox, acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_its_token_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, admin) = (free_port(), free_port());
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let text = config_text(dir.path(), smtp, admin, "").replace(
        &format!("[admin]\nlisten = \"{admin}\""),
        &format!(
            "[admin]\nlisten = \"{admin}\"\ntoken_file = \"{}\"",
            token.display()
        ),
    );
    let _daemon = Daemon::start(&write(dir.path(), &text)).await;
    let (ok, out) = ctl(admin, &["status"]).await;
    assert!(!ok && out.contains("401") && out.contains("token"), "{out}");
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "s3cret-tokem").unwrap();
    let (ok, out) = ctl(admin, &["--token-file", wrong.to_str().unwrap(), "status"]).await;
    assert!(!ok && out.contains("401"), "{out}");
    let (ok, out) = ctl(admin, &["--token-file", token.to_str().unwrap(), "status"]).await;
    assert!(ok && out.contains("node svc"), "{out}");
}

/// The first reply line of a new connection to `smtp`.
async fn greeting(smtp: SocketAddr) -> String {
    use tokio::io::AsyncBufReadExt;
    let s = tokio::net::TcpStream::connect(smtp).await.unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(s)
        .read_line(&mut line)
        .await
        .unwrap();
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_turns_clients_away_until_the_drain_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, admin) = (free_port(), free_port());
    let config = write(dir.path(), &config_text(dir.path(), smtp, admin, ""));
    let _daemon = Daemon::start(&config).await;
    let mut open = Client::connect(smtp).await.unwrap();

    let (ok, text) = ctl(admin, &["drain", "svc"]).await;
    assert!(ok && text.contains("svc draining"), "{text}");
    assert!(
        greeting(smtp).await.starts_with("421 4.3.2"),
        "new clients are turned away"
    );
    // A session open before the drain still hands in its mail, which is
    // delivered; then the node reports itself drained.
    let r = open
        .send(
            "s@b.example",
            &["u@a.example"],
            "Subject: late\r\n\r\nx\r\n",
        )
        .await
        .unwrap();
    assert!(r.starts_with("250"), "{r}");
    let drained = async {
        loop {
            let (_, text) = ctl(admin, &["status"]).await;
            if text.contains("mail: drained") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(common::node::PATIENCE, drained)
        .await
        .expect("drained");
    assert_eq!(
        common::node::eml_files(&dir.path().join("data/outbox")).len(),
        1
    );
    let (ok, text) = ctl(admin, &["drain", "other"]).await;
    assert!(!ok && text.contains("not other"), "{text}");

    let (ok, text) = ctl(admin, &["drain", "--cancel", "svc"]).await;
    assert!(ok, "{text}");
    assert!(greeting(smtp).await.starts_with("220"));
    let (_, text) = ctl(admin, &["status"]).await;
    assert!(!text.contains("mail:"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_data_directory_is_refused_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let first = write(
        dir.path(),
        &config_text(dir.path(), free_port(), free_port(), ""),
    );
    let daemon = Daemon::start(&first).await;
    // Other ports, the same data directory.
    let second = dir.path().join("second.toml");
    let text = config_text(dir.path(), free_port(), free_port(), "");
    std::fs::write(&second, text).unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_mtad"))
        .args(["run", "--config"])
        .arg(&second)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(common::node::PATIENCE, run)
        .await
        .expect("the second daemon ran on instead of refusing")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second daemon started: {err}");
    let pid = daemon.child.id().unwrap().to_string();
    assert!(
        err.contains("in use by another mtad") && err.contains(&pid),
        "{err}"
    );
    // Never said ready.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("mtad ready"));
}

#[tokio::test]
async fn without_a_configuration_file_mtad_runs_its_built_in_default() {
    // `mtad config default` prints the shipped example, byte for byte.
    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_mtad"))
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(shown.status.success());
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/mtad.toml"));
    assert_eq!(String::from_utf8(shown.stdout).unwrap(), shipped.unwrap());
    // `mtad run` alone listens on 127.0.0.1:2525 and drops mail into
    // ./var/outbox of the directory it was started in.
    let dir = tempfile::tempdir().unwrap();
    let mut node = Daemon::start_default(dir.path()).await;
    let mut client = Client::connect("127.0.0.1:2525".parse().unwrap())
        .await
        .unwrap();
    let reply = client
        .send(
            "a@example.test",
            &["b@example.test"],
            "Subject: hi\r\n\r\nbody\r\n",
        )
        .await
        .unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    node.wait_line(|l| l.contains("\"delivered\"")).await;
    let outbox: Vec<_> = std::fs::read_dir(dir.path().join("var/outbox"))
        .unwrap()
        .collect();
    assert_eq!(outbox.len(), 1, "one .eml file");
    client.command("QUIT\r\n").await.unwrap();
    // A reload has no file to read again, and says so.
    node.signal(libc::SIGHUP);
    node.wait_line(|l| l.contains("reload refused") && l.contains("--config FILE"))
        .await;
    node.signal(libc::SIGTERM);
    assert!(node.child.wait().await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_sigterm_idle_sessions_get_421_at_once_and_a_transaction_under_way_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, admin) = (free_port(), free_port());
    // A grace far beyond the test's patience: nothing here may wait for it.
    let text = config_text(dir.path(), smtp, admin, "")
        .replace("[node]\n", "[node]\nshutdown_grace = \"600s\"\n");
    let mut daemon = Daemon::start(&write(dir.path(), &text)).await;
    let mut idle = Client::connect(smtp).await.unwrap();
    let mut busy = Client::connect(smtp).await.unwrap();
    let r = busy
        .command("MAIL FROM:<a@example.test>\r\n")
        .await
        .unwrap();
    assert!(r.starts_with("250"), "{r}");
    let r = busy.command("RCPT TO:<b@dest.example>\r\n").await.unwrap();
    assert!(r.starts_with("250"), "{r}");

    daemon.signal(libc::SIGTERM);
    // The idle session is told at once, unasked.
    let r = tokio::time::timeout(common::node::PATIENCE, idle.reply())
        .await
        .expect("421 before the grace")
        .unwrap();
    assert!(r.starts_with("421 4.3.2"), "{r}");
    // The transaction under way finishes and is acknowledged...
    let r = busy.command("DATA\r\n").await.unwrap();
    assert!(r.starts_with("354"), "{r}");
    let r = busy
        .command("Subject: last\r\n\r\ntaken during the stop\r\n.\r\n")
        .await
        .unwrap();
    assert!(r.starts_with("250"), "{r}");
    // ...and no new one starts: the 421 comes with the end of it.
    let r = tokio::time::timeout(common::node::PATIENCE, busy.reply())
        .await
        .expect("421 after the transaction")
        .unwrap();
    assert!(r.starts_with("421 4.3.2"), "{r}");
    let status = tokio::time::timeout(common::node::PATIENCE, daemon.child.wait())
        .await
        .expect("stopped without waiting out the grace")
        .unwrap();
    assert!(status.success(), "{status}");
    let outbox = std::fs::read_dir(dir.path().join("data/outbox")).unwrap();
    assert_eq!(outbox.count(), 1, "the last message was kept and delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_logged_as_they_open_end_and_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp, admin) = (free_port(), free_port());
    let config = write(dir.path(), &config_text(dir.path(), smtp, admin, ""));
    let mut daemon = Daemon::start(&config).await;
    let mut c = Client::connect(smtp).await.unwrap();
    let r = c
        .send("a@b.example", &["u@a.example"], "Subject: s\r\n\r\nx\r\n")
        .await
        .unwrap();
    assert!(r.starts_with("250"), "{r}");
    assert!(c.command("BOGUS\r\n").await.unwrap().starts_with("500"));
    assert!(c.command("QUIT\r\n").await.unwrap().starts_with("221"));
    let json = |line: String| serde_json::from_str::<serde_json::Value>(&line).unwrap();
    let opened = json(
        daemon
            .wait_line(|l| l.contains("\"event\":\"connected\""))
            .await,
    );
    assert_eq!(opened["listener"], smtp.to_string(), "{opened}");
    let ended = json(
        daemon
            .wait_line(|l| l.contains("\"event\":\"disconnected\""))
            .await,
    );
    assert_eq!(
        (ended["messages"].as_u64(), ended["rejected"].as_u64()),
        (Some(1), Some(1)),
        "{ended}"
    );
    assert_eq!(ended["client"], opened["client"], "{ended}");
    assert!(ended["duration_ms"].is_u64(), "{ended}");

    let (ok, text) = ctl(admin, &["drain", "svc"]).await;
    assert!(ok, "{text}");
    assert!(Client::connect(smtp).await.is_err(), "turned away");
    let refused = json(
        daemon
            .wait_line(|l| l.contains("\"event\":\"refused\""))
            .await,
    );
    assert_eq!(refused["reason"], "draining", "{refused}");
    assert!(
        refused["reply"].as_str().unwrap().starts_with("421 4.3.2"),
        "{refused}"
    );
}
