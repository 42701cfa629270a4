//! Delivery into a local drop directory: one `.eml` file per message and
//! route, written atomically (temporary file, fsync, rename, fsync of the
//! directory), with the envelope recorded in leading header fields.
//!
//! The file name depends only on the queue id and the first recipient's
//! index, so a delivery repeated after a crash replaces the same file
//! instead of duplicating it.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{Job, JobResult, Outcome};

/// Write `job`'s message into `dir`; returns the final path.
pub fn write(dir: &Path, job: &Job, body: &[u8]) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let first = job.recipients.first().map_or(0, |r| r.index);
    let name = format!("{}-{}.eml", job.id, first);
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(&name);
    let mut head = format!(
        "Return-Path: <{}>\r\nX-Mtad-Queue-Id: {}\r\n",
        job.sender, job.id
    );
    for r in &job.recipients {
        head.push_str(&format!("X-Mtad-Rcpt-To: <{}>\r\n", r.address));
    }
    let mut f = File::create(&tmp)?;
    f.write_all(head.as_bytes())?;
    f.write_all(body)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(path)
}

/// The result of writing `job` (or failing to) for route `route`.
pub fn result(route: usize, dir: &Path, job: &Job, written: io::Result<PathBuf>) -> JobResult {
    let (outcome, reply) = match written {
        Ok(p) => (
            Outcome::Delivered,
            format!("250 2.0.0 Written to {}", p.display()),
        ),
        Err(e) => (
            Outcome::Deferred,
            format!("451 4.3.0 Cannot write to {}: {e}", dir.display()),
        ),
    };
    JobResult::all(job, route, dir.display().to_string(), outcome, &reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::JobRcpt;
    use crate::spool::QueueId;

    fn job() -> Job {
        Job {
            expires_ms: 0,
            id: QueueId(0x1F),
            sender: "a@example.test".into(),
            recipients: vec![
                JobRcpt {
                    index: 1,
                    address: "x@dest.example".into(),
                },
                JobRcpt {
                    index: 2,
                    address: "y@dest.example".into(),
                },
            ],
        }
    }

    #[test]
    fn writes_one_file_with_the_envelope_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outbox");
        let path = write(&out, &job(), b"Subject: s\r\n\r\nbody\r\n").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "Return-Path: <a@example.test>\r\nX-Mtad-Queue-Id: 000000000000001F\r\n\
             X-Mtad-Rcpt-To: <x@dest.example>\r\nX-Mtad-Rcpt-To: <y@dest.example>\r\n\
             Subject: s\r\n\r\nbody\r\n"
        );
        // Writing again (redelivery after a crash) replaces, not adds.
        write(&out, &job(), b"Subject: s\r\n\r\nbody\r\n").unwrap();
        let names: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("000000000000001F-1.eml")]
        );
    }

    #[test]
    fn an_unwritable_directory_defers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let r = result(3, &file, &job(), write(&file, &job(), b"x"));
        assert_eq!(r.route, 3);
        assert!(r
            .results
            .iter()
            .all(|r| r.outcome == Outcome::Deferred && r.reply.starts_with("451 4.3.0")));
    }
}
