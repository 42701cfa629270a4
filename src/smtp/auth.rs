//! SMTP AUTH credentials: a file of `user:PHC-hash` lines (argon2id, as
//! `mtad passwd` writes them). Checked off the session's task — argon2 is
//! slow on purpose.

use std::collections::HashMap;
use std::path::Path;

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;

/// Users and their password hashes.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    users: HashMap<String, String>,
}

impl Credentials {
    /// Read `path`; every bad line is an error naming it.
    pub fn load(path: &Path) -> Result<Credentials, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = format!("{}:{}", path.display(), i + 1);
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("{at}: expected user:hash"))?;
            let parsed =
                PasswordHash::new(hash).map_err(|e| format!("{at}: not a password hash: {e}"))?;
            // Only what `mtad passwd` writes: any other scheme would be
            // checked at another cost, telling which users exist.
            if parsed.algorithm.as_str() != "argon2id" {
                return Err(format!(
                    "{at}: not an argon2id hash (write it with mtad passwd)"
                ));
            }
            if user.is_empty() || user.contains(|c: char| c.is_control()) {
                return Err(format!("{at}: a user name without control characters"));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(format!("{at}: {user} is listed twice"));
            }
        }
        Ok(Credentials { users })
    }

    /// Whether `password` is `user`'s. Unknown users cost the same work
    /// as known ones, so timing does not tell which exist.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let dummy = DUMMY.get_or_init(|| {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(b"no such user", &salt)
                .map(|h| h.to_string())
                .unwrap_or_default()
        });
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => (dummy.as_str(), false),
        };
        let ok = PasswordHash::new(hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false);
        ok && known
    }
}

/// A `user:hash` line for `password` (argon2id, random salt).
pub fn entry(user: &str, password: &str) -> Result<String, String> {
    if user.is_empty() || user.contains([':', '\n', '\0']) {
        return Err("a user name without ':' or control characters".into());
    }
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| e.to_string())?;
    Ok(format!("{user}:{hash}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_verify_and_wrong_passwords_or_users_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let line = entry("alice", "correct horse").unwrap();
        std::fs::write(&path, format!("# users\n{line}\n")).unwrap();
        let c = Credentials::load(&path).unwrap();
        assert!(c.verify("alice", "correct horse"));
        assert!(!c.verify("alice", "wrong"));
        assert!(!c.verify("bob", "correct horse"));
        std::fs::write(&path, "alice:notahash\n").unwrap();
        let e = Credentials::load(&path).unwrap_err();
        assert!(e.contains("passwd:1"), "{e}");
        assert!(entry("a:b", "x").is_err());
    }
}
