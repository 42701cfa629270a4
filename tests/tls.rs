//! Inbound STARTTLS against a running `mtad run`, with a certificate made
//! by the test (rcgen) and a rustls client that trusts only its CA: mail
//! goes through TLS, the session starts over after the handshake, plaintext
//! pipelined behind STARTTLS is refused, and a reload picks up a renewed
//! certificate.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::daemon::{ctl, ctl_json, free_port, Daemon};
use common::peer::{Behavior, Peer};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A CA, and a certificate for mx.example.test it signed (written as
/// cert.pem and key.pem under `dir`, with `serial`).
struct Pki {
    ca: CertificateDer<'static>,
}

fn issue(dir: &Path, serial: u64) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec!["mx.example.test".to_string()]).unwrap();
    leaf.serial_number = Some(serial.into());
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem() + &ca.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    Pki {
        ca: ca.der().clone(),
    }
}

fn config(dir: &Path, smtp: SocketAddr, admin: SocketAddr) -> PathBuf {
    let text = format!(
        r#"
[node]
name = "tls"
data_dir = "{data}"

[smtp]
listen = ["{smtp}"]
hostname = "mx.example.test"
relay_networks = ["127.0.0.0/8"]

[smtp.tls]
cert = "{dir}/cert.pem"
key = "{dir}/key.pem"
require_tls = true

[[route]]
domains = ["*"]
drop_dir = "{data}/outbox"

[admin]
listen = "{admin}"
"#,
        dir = dir.display(),
        data = dir.join("data").display()
    );
    let path = dir.join("tls.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// MAIL, RCPT and DATA with `subject`, each answered as it should be.
async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    to: &str,
    subject: &str,
) {
    let content = format!("Subject: {subject}\r\n\r\nx\r\n.\r\n");
    let rcpt = format!("RCPT TO:<{to}>\r\n");
    for (line, want) in [
        ("MAIL FROM:<a@b.example>\r\n", "250"),
        (rcpt.as_str(), "250"),
        ("DATA\r\n", "354"),
        (content.as_str(), "250"),
    ] {
        let r = say(s, line).await;
        assert!(r.starts_with(want), "{line:?}: {r}");
    }
}

/// A rustls client that trusts only `ca`.
fn connector(ca: &CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(client))
}

/// One reply (all its lines).
async fn reply<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap() == 0 {
            return all;
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return all;
        }
    }
}

async fn say<S: AsyncRead + AsyncWrite + Unpin>(s: &mut BufReader<S>, line: &str) -> String {
    s.get_mut().write_all(line.as_bytes()).await.unwrap();
    reply(s).await
}

/// Connect, EHLO, STARTTLS and the handshake, trusting only `ca`; returns
/// the TLS stream and the serial of the certificate the server showed.
async fn starttls(
    smtp: SocketAddr,
    ca: &CertificateDer<'static>,
) -> (
    BufReader<tokio_rustls::client::TlsStream<TcpStream>>,
    Vec<u8>,
) {
    let mut plain = BufReader::new(TcpStream::connect(smtp).await.unwrap());
    assert!(reply(&mut plain).await.starts_with("220"));
    let ehlo = say(&mut plain, "EHLO client.test\r\n").await;
    assert!(ehlo.contains("250-STARTTLS"), "{ehlo}");
    assert!(say(&mut plain, "STARTTLS\r\n")
        .await
        .starts_with("220 2.0.0"));
    let connector = connector(ca);
    let name = ServerName::try_from("mx.example.test").unwrap();
    let tls = connector
        .connect(name, plain.into_inner())
        .await
        .expect("handshake");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let serial = serial_of(&leaf);
    (BufReader::new(tls), serial)
}

/// The serial number of a DER certificate (a small positive integer here).
fn serial_of(cert: &CertificateDer<'_>) -> Vec<u8> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version,
    // serialNumber INTEGER, ... } ... }: walk the few headers by hand.
    let d = cert.as_ref();
    let skip_header = |at: usize| -> (usize, usize) {
        let len = d[at + 1];
        if len & 0x80 == 0 {
            (at + 2, len as usize)
        } else {
            let n = (len & 0x7f) as usize;
            let l = d[at + 2..at + 2 + n]
                .iter()
                .fold(0usize, |a, b| a << 8 | *b as usize);
            (at + 2 + n, l)
        }
    };
    let (tbs, _) = skip_header(0);
    let (inner, _) = skip_header(tbs);
    let (version_end, vlen) = skip_header(inner);
    let (serial, slen) = skip_header(version_end + vlen);
    d[serial..serial + slen].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_goes_through_starttls_and_injection_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = issue(dir.path(), 1);
    let (smtp, admin) = (free_port(), free_port());
    let _daemon = Daemon::start(&config(dir.path(), smtp, admin)).await;

    // A relaying client must start TLS first (require_tls).
    let mut plain = BufReader::new(TcpStream::connect(smtp).await.unwrap());
    reply(&mut plain).await;
    say(&mut plain, "EHLO client.test\r\n").await;
    let r = say(&mut plain, "MAIL FROM:<a@b.example>\r\n").await;
    assert!(r.starts_with("530 5.7.0"), "{r}");

    let (mut tls, serial) = starttls(smtp, &pki.ca).await;
    assert_eq!(serial, [1]);
    // The session started over: EHLO again, STARTTLS no longer offered.
    let r = say(&mut tls, "MAIL FROM:<a@b.example>\r\n").await;
    assert!(r.starts_with("503"), "{r}");
    let ehlo = say(&mut tls, "EHLO client.test\r\n").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    transaction(&mut tls, "c@d.example", "over tls").await;
    assert!(say(&mut tls, "QUIT\r\n").await.starts_with("221"));
    let outbox = dir.path().join("data/outbox");
    common::node::files_arrive(&outbox, 1).await;

    // CVE-2011-0411: commands pipelined in plaintext behind STARTTLS.
    let mut evil = BufReader::new(TcpStream::connect(smtp).await.unwrap());
    reply(&mut evil).await;
    say(&mut evil, "EHLO client.test\r\n").await;
    let r = say(&mut evil, "STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n").await;
    assert!(r.starts_with("554 5.5.1"), "{r}");
    assert_eq!(reply(&mut evil).await, "", "and the connection is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_picks_up_a_renewed_certificate_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let first = issue(dir.path(), 1);
    let (smtp, admin) = (free_port(), free_port());
    let _daemon = Daemon::start(&config(dir.path(), smtp, admin)).await;
    assert_eq!(starttls(smtp, &first.ca).await.1, [1]);

    let renewed = issue(dir.path(), 2);
    let (ok, text) = ctl(admin, &["reload"]).await;
    assert!(ok, "{text}");
    assert_eq!(
        starttls(smtp, &renewed.ca).await.1,
        [2],
        "the new certificate"
    );

    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let (ok, text) = ctl(admin, &["reload"]).await;
    assert!(!ok && text.contains("key.pem"), "{text}");
    assert_eq!(
        starttls(smtp, &renewed.ca).await.1,
        [2],
        "the running one stays"
    );

    // check-config says so too, with the file, and where [smtp.tls] is.
    let cfg = dir.path().join("tls.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mtad"))
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key.pem"), "{err}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let line = 1 + text.lines().position(|l| l.trim() == "[smtp.tls]").unwrap();
    let at = format!("{}:{line}:", cfg.display());
    assert!(err.starts_with(&at) && err.contains("smtp.tls:"), "{err}");
}

/// A node relaying by route: a.example must use verified TLS (our CA,
/// our name), b.example opportunistic TLS, c.example verified TLS against
/// the system's roots (which do not know our CA), d.example verified TLS
/// to a next hop that offers none.
fn sender_config(
    dir: &Path,
    smtp: SocketAddr,
    admin: SocketAddr,
    tls_hop: SocketAddr,
    plain_hop: SocketAddr,
) -> PathBuf {
    let ca = dir.join("pki/ca.pem");
    let text = format!(
        r#"
[node]
name = "sender"
data_dir = "{data}"

[smtp]
listen = ["{smtp}"]
hostname = "sender.example.test"
relay_networks = ["127.0.0.0/8"]

[delivery]
retry = ["1h"]

[[route]]
domains = ["a.example"]
next_hops = ["{tls_hop}"]
tls = "required"
tls_ca = "{ca}"
tls_name = "mx.example.test"

[[route]]
domains = ["b.example"]
next_hops = ["{tls_hop}"]

[[route]]
domains = ["c.example"]
next_hops = ["{tls_hop}"]
tls = "required"
tls_name = "mx.example.test"

[[route]]
domains = ["d.example"]
next_hops = ["{plain_hop}"]
tls = "required"

[admin]
listen = "{admin}"
"#,
        data = dir.join("sender").display(),
        ca = ca.display(),
    );
    let path = dir.join("sender.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_get_the_tls_they_ask_for_and_never_less() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    issue(&pki_dir, 7);
    let (rx_smtp, rx_admin) = (free_port(), free_port());
    let _receiver = Daemon::start(&config(&pki_dir, rx_smtp, rx_admin)).await;
    let plain = Peer::start(Behavior::default()).await;
    let (smtp, admin) = (free_port(), free_port());
    let _sender = Daemon::start(&sender_config(dir.path(), smtp, admin, rx_smtp, plain.addr)).await;

    let mut c = common::client::Client::connect(smtp).await.unwrap();
    for to in ["u@a.example", "u@b.example", "u@c.example", "u@d.example"] {
        let body = format!("Subject: to {to}\r\n\r\nx\r\n");
        let r = c.send("s@sender.example.test", &[to], &body).await.unwrap();
        assert!(r.starts_with("250"), "{to}: {r}");
    }
    // a and b arrive, over TLS (the receiver says ESMTPS).
    let outbox = pki_dir.join("data/outbox");
    common::node::files_arrive(&outbox, 2).await;
    for f in common::node::eml_files(&outbox) {
        let m = std::fs::read_to_string(f).unwrap();
        assert!(m.contains("with ESMTPS"), "{m}");
        assert!(
            m.contains("to u@a.example") || m.contains("to u@b.example"),
            "{m}"
        );
    }
    // c and d wait, each with the reason, and nothing went in plaintext.
    let waiting = async {
        loop {
            let page: serde_json::Value = ctl_json(admin, &["queue", "list"]).await;
            let rows = page["messages"].as_array().cloned().unwrap_or_default();
            let replies: Vec<String> = rows
                .iter()
                .filter_map(|r| r["last_reply"].as_str().map(String::from))
                .collect();
            if replies.len() == 2 {
                return replies;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let replies = tokio::time::timeout(common::node::PATIENCE, waiting)
        .await
        .expect("two deferred");
    assert!(
        replies
            .iter()
            .any(|r| r.starts_with("451 4.7.5") && r.contains("TLS failed")),
        "{replies:?}"
    );
    assert!(
        replies
            .iter()
            .any(|r| r.starts_with("451 4.7.4") && r.contains("not offered")),
        "{replies:?}"
    );
    assert!(
        plain.messages().is_empty(),
        "a required route went in plaintext"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_implicit_tls_port_speaks_tls_from_the_first_byte() {
    let dir = tempfile::tempdir().unwrap();
    let pki = issue(dir.path(), 3);
    let (smtp, admin, implicit) = (free_port(), free_port(), free_port());
    let path = config(dir.path(), smtp, admin);
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "require_tls = true",
        &format!("require_tls = true\nimplicit_listen = [\"{implicit}\"]"),
    );
    std::fs::write(&path, text).unwrap();
    let _daemon = Daemon::start(&path).await;

    let connector = connector(&pki.ca);
    let name = ServerName::try_from("mx.example.test").unwrap();
    let tcp = TcpStream::connect(implicit).await.unwrap();
    let mut tls = BufReader::new(connector.connect(name, tcp).await.expect("handshake first"));
    assert!(reply(&mut tls).await.starts_with("220"));
    let ehlo = say(&mut tls, "EHLO client.test\r\n").await;
    assert!(
        ehlo.starts_with("250") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    transaction(&mut tls, "c@d.example", "implicit").await;
    assert!(say(&mut tls, "QUIT\r\n").await.starts_with("221"));
    let outbox = dir.path().join("data/outbox");
    common::node::files_arrive(&outbox, 1).await;
    let m = std::fs::read_to_string(&common::node::eml_files(&outbox)[0]).unwrap();
    assert!(m.contains("with ESMTPS"), "{m}");
    // A plaintext client on that port gets no SMTP greeting.
    let mut plain = BufReader::new(TcpStream::connect(implicit).await.unwrap());
    plain
        .get_mut()
        .write_all(b"EHLO plain.test\r\n")
        .await
        .unwrap();
    let r = reply(&mut plain).await;
    assert!(!r.starts_with("220") && !r.starts_with("250"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_client_may_relay_and_guessing_is_slowed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = issue(dir.path(), 4);
    // `mtad passwd` writes the credentials line from the password on stdin.
    let mut passwd = std::process::Command::new(env!("CARGO_BIN_EXE_mtad"))
        .args(["passwd", "alice"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    passwd
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret pass\n")
        .unwrap();
    let out = passwd.wait_with_output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with("alice:$argon2id$"), "{line}");
    std::fs::write(dir.path().join("passwd"), &line).unwrap();

    let (smtp, admin) = (free_port(), free_port());
    let path = config(dir.path(), smtp, admin);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("relay_networks = [\"127.0.0.0/8\"]", "relay_networks = []")
        .replace(
            "[[route]]",
            &format!(
                "[smtp.auth]\ncredentials = \"{}\"\n\n[[route]]",
                dir.path().join("passwd").display()
            ),
        );
    std::fs::write(&path, text).unwrap();
    let mut daemon = Daemon::start(&path).await;

    let (mut tls, _) = starttls(smtp, &pki.ca).await;
    let ehlo = say(&mut tls, "EHLO client.test\r\n").await;
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN"), "{ehlo}");
    say(&mut tls, "MAIL FROM:<a@b.example>\r\n").await;
    let r = say(&mut tls, "RCPT TO:<c@far.example>\r\n").await;
    assert!(r.starts_with("554 5.7.1"), "not before AUTH: {r}");
    say(&mut tls, "RSET\r\n").await;
    // "\0alice\0s3cret pass"
    let r = say(&mut tls, "AUTH PLAIN AGFsaWNlAHMzY3JldCBwYXNz\r\n").await;
    assert!(r.starts_with("235 2.7.0"), "{r}");
    transaction(&mut tls, "c@far.example", "relayed").await;
    let outbox = dir.path().join("data/outbox");
    common::node::files_arrive(&outbox, 1).await;
    let m = std::fs::read_to_string(&common::node::eml_files(&outbox)[0]).unwrap();
    assert!(m.contains("with ESMTPSA"), "{m}");
    // The received event names who authenticated.
    daemon
        .wait_line(|l| l.contains("\"event\":\"received\"") && l.contains("\"user\":\"alice\""))
        .await;

    // Wrong passwords: 535 each, then the address must wait.
    let (mut guess, _) = starttls(smtp, &pki.ca).await;
    say(&mut guess, "EHLO guesser.test\r\n").await;
    let mut replies = Vec::new();
    for _ in 0..6 {
        // "\0alice\0wrong"
        replies.push(say(&mut guess, "AUTH PLAIN AGFsaWNlAHdyb25n\r\n").await);
    }
    assert!(
        replies[..5].iter().all(|r| r.starts_with("535 5.7.8")),
        "{replies:?}"
    );
    assert!(replies[5].starts_with("454 4.7.0"), "{replies:?}");
}
