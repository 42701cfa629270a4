//! A real authoritative DNS server for the MX tests: Knot DNS (`knotd`,
//! Debian package knot) on a loopback port, serving the zones a test
//! writes. Killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// A running `knotd`.
pub struct Knot {
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Knot {
    /// Serve `zones` ((origin, zone file text); text None: configured but
    /// its file missing, so it answers SERVFAIL) from files in `dir`, on
    /// `addr`.
    pub fn start(dir: &Path, addr: SocketAddr, zones: &[(&str, Option<&str>)]) -> Knot {
        let mut conf = format!(
            "server:\n    listen: {}@{}\n    rundir: {d}\n\
             database:\n    storage: {d}/db\n\
             template:\n  - id: default\n    storage: {d}\n    file: \"%s.zone\"\n    \
             zonefile-load: whole\n    journal-content: none\n\
             log:\n  - target: stderr\n    any: warning\nzone:\n",
            addr.ip(),
            addr.port(),
            d = dir.display()
        );
        for (origin, text) in zones {
            conf.push_str(&format!("  - domain: {origin}\n"));
            if let Some(text) = text {
                std::fs::write(dir.join(format!("{origin}.zone")), text).unwrap();
            }
        }
        std::fs::write(dir.join("knot.conf"), conf).unwrap();
        let child = Command::new("knotd")
            .arg("-c")
            .arg(dir.join("knot.conf"))
            .stderr(std::fs::File::create(dir.join("knotd.log")).unwrap())
            .spawn()
            .expect("knotd must be installed (Debian package knot; .ci/run does it)");
        let knot = Knot {
            addr,
            dir: dir.to_path_buf(),
            child,
        };
        knot.until_answering();
        knot
    }

    fn knotc(&self, args: &[&str]) -> std::process::Output {
        Command::new("knotc")
            .arg("-c")
            .arg(self.dir.join("knot.conf"))
            .args(args)
            .output()
            .expect("knotc")
    }

    /// Until its control socket answers: it then serves its zones.
    fn until_answering(&self) {
        let deadline = mtad::clock::instant() + std::time::Duration::from_secs(30);
        while !self.knotc(&["status"]).status.success() {
            assert!(
                mtad::clock::instant() < deadline,
                "knotd did not start: {}",
                std::fs::read_to_string(self.dir.join("knotd.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Write `origin`'s zone file and load it.
    pub fn load(&self, origin: &str, text: &str) {
        std::fs::write(self.dir.join(format!("{origin}.zone")), text).unwrap();
        let out = self.knotc(&["zone-reload", origin]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
