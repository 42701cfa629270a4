//! SMTP paths (`<...>` in MAIL/RCPT) parsed strictly by ourselves.
//!
//! smtp_proto's address parser silently strips source routes and quotes
//! and rejects address literals, which hides exactly what relay policy
//! must see; so we cut the path out of the command line, parse it here, and
//! hand smtp_proto a line with `<>` in its place for the parameters.

/// Longest mailbox we accept (RFC 5321 §4.5.3.1.3 path limit minus brackets).
const MAX_MAILBOX: usize = 254;

/// A parsed, non-empty path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// The local part exactly as written (quotes kept).
    pub local: String,
    /// The domain as written: a name or a `[...]` literal.
    pub domain: String,
    /// Whether a source route (`@a,@b:`) preceded the mailbox.
    pub routed: bool,
}

impl Path {
    /// Whether the local part carries routing syntax (`%`, `!`, quoted `@`)
    /// that a downstream MTA might interpret as another hop.
    pub fn has_relay_syntax(&self) -> bool {
        self.local.bytes().any(|b| matches!(b, b'%' | b'!' | b'@'))
    }

    /// The mailbox to store: route dropped, domain lower-cased and without
    /// a trailing dot, so that duplicates compare equal.
    pub fn mailbox(&self) -> String {
        let domain = self.domain.strip_suffix('.').unwrap_or(&self.domain);
        format!("{}@{}", self.local, domain.to_ascii_lowercase())
    }
}

/// Why a path failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not a syntactically valid mailbox.
    Syntax,
    /// A bare local part without `@domain`.
    NoDomain,
}

/// Where the `<...>` of a MAIL/RCPT line is: byte range of the content
/// between the brackets. `None` when there is no complete bracketed path.
pub fn locate(line: &[u8]) -> Option<(usize, usize)> {
    let open = line.iter().position(|&b| b == b'<')?;
    let mut in_quote = false;
    let mut escaped = false;
    for (i, &b) in line.iter().enumerate().skip(open + 1) {
        if escaped {
            escaped = false;
        } else if in_quote && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            in_quote = !in_quote;
        } else if b == b'>' && !in_quote {
            return Some((open + 1, i));
        } else if b == b'\r' || b == b'\n' {
            return None;
        }
    }
    None
}

/// Parse the content of a path; `Ok(None)` is the null path `<>`.
pub fn parse(raw: &[u8]) -> Result<Option<Path>, PathError> {
    if raw.is_empty() {
        return Ok(None);
    }
    let (routed, mailbox) = match raw.first() {
        Some(b'@') => {
            let colon = raw
                .iter()
                .position(|&b| b == b':')
                .ok_or(PathError::Syntax)?;
            check_route(&raw[..colon])?;
            (true, &raw[colon + 1..])
        }
        _ => (false, raw),
    };
    if mailbox.len() > MAX_MAILBOX {
        return Err(PathError::Syntax);
    }
    let local_len = local_part_len(mailbox)?;
    let (local, rest) = mailbox.split_at(local_len);
    let domain = match rest.split_first() {
        None => return Err(PathError::NoDomain),
        Some((b'@', domain)) => domain,
        Some(_) => return Err(PathError::Syntax),
    };
    if !valid_domain(domain) {
        return Err(PathError::Syntax);
    }
    // Both halves were checked to be ASCII above.
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(Some(Path {
        local: text(local),
        domain: text(domain),
        routed,
    }))
}

/// `@one,@two` — each hop a domain.
fn check_route(route: &[u8]) -> Result<(), PathError> {
    for hop in route.split(|&b| b == b',') {
        match hop.split_first() {
            Some((b'@', domain)) if valid_domain(domain) => {}
            _ => return Err(PathError::Syntax),
        }
    }
    Ok(())
}

/// Length of the local part at the start of `s` (dot-string or quoted).
fn local_part_len(s: &[u8]) -> Result<usize, PathError> {
    if s.first() == Some(&b'"') {
        let mut i = 1;
        while i < s.len() {
            match s[i] {
                b'\\' if i + 1 < s.len() && (32..=126).contains(&s[i + 1]) => i += 2,
                b'"' => {
                    return if i > 1 {
                        Ok(i + 1)
                    } else {
                        Err(PathError::Syntax)
                    }
                }
                32..=126 => i += 1,
                _ => return Err(PathError::Syntax),
            }
        }
        return Err(PathError::Syntax);
    }
    let len = s.iter().position(|&b| b == b'@').unwrap_or(s.len());
    let local = &s[..len];
    let atoms_ok = local.split(|&b| b == b'.').all(|atom| {
        !atom.is_empty()
            && atom
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || is_atext_special(b))
    });
    if atoms_ok {
        Ok(len)
    } else {
        Err(PathError::Syntax)
    }
}

fn is_atext_special(b: u8) -> bool {
    b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

/// A domain name (one trailing dot tolerated) or an address literal; a
/// literal is kept with its brackets so policy can match it verbatim.
fn valid_domain(d: &[u8]) -> bool {
    if let Some(inner) = d.strip_prefix(b"[").and_then(|d| d.strip_suffix(b"]")) {
        return !inner.is_empty() && inner.iter().all(|&b| matches!(b, 33..=90 | 94..=126));
    }
    let d = d.strip_suffix(b".").unwrap_or(d);
    !d.is_empty()
        && d.len() <= 253
        && d.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && label.first() != Some(&b'-')
                && label.last() != Some(&b'-')
        })
}

/// Whether `domain` is one of `accepted` (case-insensitive, a trailing dot
/// on either side ignored).
pub fn domain_in(domain: &str, accepted: &[String]) -> bool {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    accepted.iter().any(|a| {
        let a = a.strip_suffix('.').unwrap_or(a);
        a.eq_ignore_ascii_case(d)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> Path {
        parse(raw.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn plain_and_null() {
        assert_eq!(parse(b"").unwrap(), None);
        let p = ok("John.Doe@Example.TEST");
        assert_eq!(p.local, "John.Doe");
        assert_eq!(p.mailbox(), "John.Doe@example.test");
        assert!(!p.routed && !p.has_relay_syntax());
    }

    #[test]
    fn source_route_is_seen_and_dropped() {
        let p = ok("@relay.example,@b.example:user@c.example");
        assert!(p.routed);
        assert_eq!(p.mailbox(), "user@c.example");
        assert_eq!(parse(b"@:user@c"), Err(PathError::Syntax));
    }

    #[test]
    fn quoted_local_part_keeps_quotes() {
        let p = ok("\"a@b\"@example.test");
        assert_eq!(p.local, "\"a@b\"");
        assert!(p.has_relay_syntax());
        assert!(ok("\"a b\\\"c\"@x.test").local.contains(' '));
        assert_eq!(parse(b"\"\"@x"), Err(PathError::Syntax));
        assert_eq!(parse(b"\"abc@x"), Err(PathError::Syntax));
    }

    #[test]
    fn relay_syntax() {
        assert!(ok("a%b@example.test").has_relay_syntax());
        assert!(ok("b!a@example.test").has_relay_syntax());
    }

    #[test]
    fn literals_and_trailing_dot() {
        // Literals are matched against accept_domains like names.
        assert_eq!(ok("u@[192.0.2.1]").domain, "[192.0.2.1]");
        assert_eq!(ok("u@[IPv6:2001:db8::1]").domain, "[IPv6:2001:db8::1]");
        assert_eq!(ok("u@example.test.").domain, "example.test.");
        assert!(domain_in("EXAMPLE.test.", &["example.test".into()]));
        assert!(domain_in("example.test", &["example.test.".into()]));
        assert!(!domain_in("xexample.test", &["example.test".into()]));
    }

    #[test]
    fn rejects() {
        assert_eq!(parse(b"user"), Err(PathError::NoDomain));
        for bad in [
            "a..b@x", ".a@x", "a.@x", "a@", "a@-x", "a@x..y", "a b@x", "a@x@y", "a@[]", "a@[a[b]",
            "é@x",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
        let long = format!("{}@x.test", "a".repeat(250));
        assert!(parse(long.as_bytes()).is_err());
    }

    #[test]
    fn locate_respects_quotes() {
        let line = b"RCPT TO:<\"a>b\"@x> NOTIFY=NEVER\r\n";
        let (s, e) = locate(line).unwrap();
        assert_eq!(&line[s..e], b"\"a>b\"@x");
        assert_eq!(locate(b"MAIL FROM:<a@b\r\n"), None);
        assert_eq!(locate(b"MAIL FROM:a@b\r\n"), None);
    }
}
