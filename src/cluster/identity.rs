//! Who this node is (configured name + incarnation) and the cluster secret.
//!
//! The incarnation is a random id made once per data directory: a node that
//! comes back with a wiped data dir is a *different* member as far as the
//! cluster is concerned, so its stale entry can be replaced instead of being
//! trusted with state it no longer has.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::FileProblem;

/// File (inside the cluster data dir) that holds the incarnation.
pub const INCARNATION_FILE: &str = "incarnation";
/// The file counting the starts of a data directory ([`next_generation`]).
pub const GENERATION_FILE: &str = "generation";
/// Shortest secret accepted; shorter ones are guessable offline from a
/// captured handshake.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest node or cluster name the handshake accepts.
pub const MAX_NAME_LEN: usize = 255;

/// A node's identity: its configured name and its incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The configured `[node] name`.
    pub name: String,
    /// Random non-zero id of this node's data dir.
    pub incarnation: u64,
}

/// Why the identity could not be loaded or created.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// Reading, writing or syncing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The incarnation file exists but does not hold a valid incarnation.
    /// It is never replaced silently: that would change who we are.
    #[error("{path}: corrupt incarnation file ({reason}); restore it or remove the data dir")]
    Corrupt {
        /// The incarnation file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The configured name is unusable.
    #[error("invalid node name {0:?}: must be 1 to 255 bytes")]
    BadName(String),
    /// The OS random source failed.
    #[error("random source failed: {0}")]
    Random(getrandom::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Identity {
    /// Reads this node's incarnation from `dir`, creating it (and `dir`) on first start.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Identity, IdentityError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(IdentityError::BadName(name.to_owned()));
        }
        let path = dir.join(INCARNATION_FILE);
        let incarnation = match fs::read(&path) {
            Ok(content) => {
                parse_incarnation(&content).map_err(|reason| IdentityError::Corrupt {
                    path: path.clone(),
                    reason,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_incarnation(dir)?,
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(Identity {
            name: name.to_owned(),
            incarnation,
        })
    }
}

fn parse_incarnation(content: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(content).map_err(|_| "not UTF-8".to_owned())?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let value: u64 = text
        .parse()
        .map_err(|_| format!("expected a decimal number, found {:?}", truncate(text, 40)))?;
    if value == 0 {
        return Err("incarnation 0 is reserved".to_owned());
    }
    Ok(value)
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Makes a fresh incarnation and stores it so that a crash at any point
/// leaves either no file (retried on next start) or the complete file.
fn create_incarnation(dir: &Path) -> Result<u64, IdentityError> {
    // Creation time in milliseconds in the high bits, randomness in the
    // low 20: a newer data dir always has the larger incarnation, so the
    // cluster can tell a wiped node (newer: replaces its stale entry) from
    // an old disk brought back (older: refused); the random bits keep two
    // nodes made in the same millisecond apart. Never zero.
    let mut buf = [0u8; 4];
    getrandom::fill(&mut buf).map_err(IdentityError::Random)?;
    let random = u64::from(u32::from_be_bytes(buf) & 0xF_FFFF);
    let now_ms = crate::clock::now_ms();
    let incarnation = ((now_ms << 20) | random).max(1);
    write_atomic(dir, INCARNATION_FILE, incarnation)?;
    Ok(incarnation)
}

/// Writes `value` to `dir/name` so that a crash at any point leaves the
/// old file or the complete new one, durable once this returns.
fn write_atomic(dir: &Path, name: &str, value: u64) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(name);
    // A leftover temp file is from a crash before rename: it was never the
    // value, so overwriting it is safe.
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(format!("{value}\n").as_bytes())
        .map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    // The rename is only durable once the directory entry is.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Counts this start of the node's data directory: one more than the
/// last, durable before the node takes part in the cluster. The cluster
/// records the highest it has seen per incarnation, so a data directory
/// restored from an older copy (whose count is behind) is recognised when
/// it rejoins, instead of voting with a vote and log older than what the
/// node promised its peers.
pub fn next_generation(dir: &Path) -> Result<u64, IdentityError> {
    let path = dir.join(GENERATION_FILE);
    let last = match fs::read(&path) {
        Ok(content) => std::str::from_utf8(&content)
            .ok()
            .and_then(|t| t.trim_end().parse::<u64>().ok())
            .ok_or_else(|| IdentityError::Corrupt {
                path: path.clone(),
                reason: "expected a decimal number".into(),
            })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(&path)(e)),
    };
    let next = last + 1;
    write_atomic(dir, GENERATION_FILE, next)?;
    Ok(next)
}

/// The shared cluster secret. Its content never appears in Debug output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The secret a node proves it belongs with, and others it also accepts
/// from peers while the cluster moves from one secret to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring {
    /// Proves this node, and keys the links it opens.
    pub proving: Secret,
    /// Also accepted from peers (an old secret going, or a new one coming).
    pub accepted: Vec<Secret>,
}

impl From<Secret> for Keyring {
    fn from(proving: Secret) -> Keyring {
        Keyring {
            proving,
            accepted: Vec::new(),
        }
    }
}

impl Keyring {
    /// The fingerprints of the proving secret, then of the accepted ones.
    pub fn fingerprints(&self) -> Vec<String> {
        self.all().map(Secret::fingerprint).collect()
    }

    /// Every secret a peer may prove with, the proving one first.
    pub fn all(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.proving).chain(&self.accepted)
    }
}

/// Why the cluster secret was refused.
#[derive(Debug, Error)]
pub enum SecretError {
    /// The secret file could not be read.
    #[error("cluster secret file {path}: {source}")]
    Io {
        /// The secret file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The secret (after trimming whitespace) is too short.
    #[error("cluster secret is {len} bytes; at least {min} are required")]
    TooShort {
        /// Length after trimming.
        len: usize,
        /// The minimum, [`MIN_SECRET_LEN`].
        min: usize,
    },
    /// The secret in this file is too short.
    #[error("cluster secret file {path} holds {len} bytes; at least {min} are required")]
    TooShortIn {
        /// The secret file.
        path: PathBuf,
        /// Length after trimming.
        len: usize,
        /// The minimum, [`MIN_SECRET_LEN`].
        min: usize,
    },
}

impl Secret {
    /// Wraps secret bytes, trimming surrounding whitespace and enforcing the minimum length.
    pub fn new(bytes: &[u8]) -> Result<Secret, SecretError> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort {
                len: trimmed.len(),
                min: MIN_SECRET_LEN,
            });
        }
        Ok(Secret(trimmed.to_vec()))
    }

    /// A short name for the secret that reveals nothing of it (8 hex
    /// digits of a MAC under it), so operators can compare nodes' keyrings.
    pub fn fingerprint(&self) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(b"mtad-cluster fingerprint");
        let tag = mac.finalize().into_bytes();
        tag[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The secret bytes, for keying the handshake MAC and the link keys only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// Reads the cluster secret from `path` (content trimmed; at least 16 bytes).
pub fn load_secret(path: &Path) -> Result<Secret, SecretError> {
    let content = fs::read(path).map_err(|source| SecretError::Io {
        path: path.to_owned(),
        source,
    })?;
    warn_if_exposed(path);
    Secret::new(&content).map_err(|e| match e {
        SecretError::TooShort { len, min } => SecretError::TooShortIn {
            path: path.to_owned(),
            len,
            min,
        },
        other => other,
    })
}

/// Loads the secrets `[cluster]` names: the one to prove with, then
/// those also accepted.
pub fn load_keyring(cfg: &crate::config::ClusterConfig) -> Result<Keyring, SecretError> {
    Ok(Keyring {
        proving: load_secret(&cfg.secret_file)?,
        accepted: cfg
            .accept_secret_files
            .iter()
            .map(|path| load_secret(path))
            .collect::<Result<_, _>>()?,
    })
}

/// The secret files `[cluster]` names that do not load, by field, and why
/// (where [`load_keyring`] stops at the first).
pub fn check_secret_files(cfg: &crate::config::ClusterConfig) -> Vec<FileProblem> {
    let named = std::iter::once(("cluster.secret_file".to_string(), &cfg.secret_file)).chain(
        cfg.accept_secret_files
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("cluster.accept_secret_files[{i}]"), p)),
    );
    named
        .filter_map(|(field, path)| {
            let message = load_secret(path).err()?.to_string();
            Some(FileProblem { field, message })
        })
        .collect()
}

/// A secret readable by others is still usable (refusing would take the
/// cluster down over a chmod), but the operator should hear about it.
#[cfg(unix)]
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "cluster secret file is readable by group or others; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_exposed(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_start_counts_one_more_and_a_damaged_count_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("cluster");
        assert_eq!(next_generation(&sub).unwrap(), 1);
        assert_eq!(next_generation(&sub).unwrap(), 2);
        assert_eq!(
            fs::read_to_string(sub.join(GENERATION_FILE)).unwrap(),
            "2\n"
        );
        assert!(!sub.join("generation.tmp").exists());
        fs::write(sub.join(GENERATION_FILE), "two").unwrap();
        assert!(matches!(
            next_generation(&sub),
            Err(IdentityError::Corrupt { .. })
        ));
    }

    #[test]
    fn incarnation_is_created_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("cluster");
        let a = Identity::load_or_create(&sub, "node-a").unwrap();
        assert_ne!(a.incarnation, 0);
        assert_eq!(a.name, "node-a");
        let b = Identity::load_or_create(&sub, "node-a").unwrap();
        assert_eq!(a, b);
        assert!(!sub.join("incarnation.tmp").exists());
    }

    #[test]
    fn new_data_dir_is_new_incarnation() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(d1.path(), "n").unwrap();
        let b = Identity::load_or_create(d2.path(), "n").unwrap();
        assert_ne!(a.incarnation, b.incarnation);
    }

    #[test]
    fn corrupt_incarnation_is_an_error_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(INCARNATION_FILE);
        for bad in [&b""[..], b"abc\n", b"0\n", b"12 34", b"\xff\xfe", b"-5"] {
            fs::write(&path, bad).unwrap();
            let err = Identity::load_or_create(dir.path(), "n").unwrap_err();
            assert!(
                matches!(err, IdentityError::Corrupt { .. }),
                "{bad:?}: {err}"
            );
            assert_eq!(fs::read(&path).unwrap(), bad, "file must not be replaced");
        }
    }

    #[test]
    fn reads_incarnation_without_newline() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(INCARNATION_FILE), "42").unwrap();
        let id = Identity::load_or_create(dir.path(), "n").unwrap();
        assert_eq!(id.incarnation, 42);
    }

    #[test]
    fn leftover_temp_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("incarnation.tmp"), "garbage").unwrap();
        let id = Identity::load_or_create(dir.path(), "n").unwrap();
        let again = Identity::load_or_create(dir.path(), "n").unwrap();
        assert_eq!(id, again);
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Identity::load_or_create(dir.path(), ""),
            Err(IdentityError::BadName(_))
        ));
        let long = "x".repeat(256);
        assert!(matches!(
            Identity::load_or_create(dir.path(), &long),
            Err(IdentityError::BadName(_))
        ));
    }

    #[test]
    fn secret_is_trimmed_and_length_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        fs::write(&path, "  0123456789abcdef\n").unwrap();
        assert_eq!(load_secret(&path).unwrap().expose(), b"0123456789abcdef");
        fs::write(&path, "0123456789abcde\n").unwrap();
        assert!(matches!(
            load_secret(&path),
            Err(SecretError::TooShortIn { len: 15, .. })
        ));
        fs::write(&path, " \n\t").unwrap();
        assert!(matches!(
            load_secret(&path),
            Err(SecretError::TooShortIn { len: 0, .. })
        ));
        assert!(matches!(
            load_secret(&dir.path().join("missing")),
            Err(SecretError::Io { .. })
        ));
    }

    #[test]
    fn fingerprints_tell_secrets_apart_and_reveal_nothing() {
        let a = Secret::new(b"correct horse battery staple").unwrap();
        let b = Secret::new(b"incorrect horse battery staple").unwrap();
        assert_eq!(
            a.fingerprint(),
            Secret::new(b" correct horse battery staple\n")
                .unwrap()
                .fingerprint()
        );
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 8);
        assert!(a.fingerprint().chars().all(|c| c.is_ascii_hexdigit()));
        let ring = Keyring {
            proving: b.clone(),
            accepted: vec![a.clone()],
        };
        assert_eq!(ring.fingerprints(), [b.fingerprint(), a.fingerprint()]);
    }

    #[test]
    fn secret_debug_hides_content() {
        let s = Secret::new(b"super-secret-value-123").unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("super"), "{shown}");
    }
}
