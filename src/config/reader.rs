//! A small typed reader over a spanned `toml_edit` document.
//!
//! Unlike serde it never stops: every conversion that fails records a
//! [`ConfigError`] with the line and column of the offending item and returns
//! `None`, so the caller can carry on and report everything in one go.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use toml_edit::{Item, TableLike, Value};

use super::error::{position, ConfigError};

/// Byte range of an item in the source, when the parser recorded one.
pub(super) type Span = Option<Range<usize>>;

/// Shared state of one load: the source (to turn spans into positions) and
/// every error found so far.
pub(super) struct Ctx<'s> {
    src: &'s str,
    file: &'s str,
    /// Errors in the order they were found.
    pub(super) errors: Vec<ConfigError>,
}

/// One item of the document together with where it is and what it is called.
#[derive(Clone)]
pub(super) struct Located<'d> {
    /// The TOML item itself.
    pub(super) item: Ref<'d>,
    /// Where to point at when the item is wrong.
    pub(super) span: Span,
    /// Dotted path such as `route[1].next_hops[0]`.
    pub(super) path: String,
}

/// A table-level item or an element of an array (which toml_edit keeps as
/// a bare `Value`).
#[derive(Clone, Copy)]
pub(super) enum Ref<'d> {
    /// A key's item.
    Item(&'d Item),
    /// An array element.
    Value(&'d Value),
}

impl<'d> Ref<'d> {
    /// The item as a plain value (not a `[table]` or `[[array]]`).
    pub(super) fn value(self) -> Option<&'d Value> {
        match self {
            Ref::Item(i) => i.as_value(),
            Ref::Value(v) => Some(v),
        }
    }

    fn table_like(self) -> Option<&'d dyn TableLike> {
        match self {
            Ref::Item(i) => i.as_table_like(),
            Ref::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    pub(super) fn as_str(self) -> Option<&'d str> {
        self.value().and_then(Value::as_str)
    }
}

/// A table being read: keys are taken one by one, and whatever was not asked
/// for is reported as unknown by [`Fields::finish`].
pub(super) struct Fields<'d> {
    table: Option<&'d dyn TableLike>,
    /// Dotted path of the table itself (empty for the root).
    pub(super) path: String,
    /// The table header (or its key), where "missing key" errors point.
    pub(super) span: Span,
    asked: Vec<&'static str>,
}

impl<'s> Ctx<'s> {
    /// A context for `src`, naming `file` in messages.
    pub(super) fn new(src: &'s str, file: &'s str) -> Self {
        Ctx {
            src,
            file,
            errors: Vec::new(),
        }
    }

    /// Records an error at `span` (line 1, column 1 when there is none).
    pub(super) fn error(&mut self, span: &Span, field: &str, message: impl Into<String>) {
        let (line, column) = match span {
            Some(r) => position(self.src, r.start),
            None => (1, 1),
        };
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            column,
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// Records "expected `what`, found <description of the node>".
    pub(super) fn mismatch(&mut self, n: &Located<'_>, what: &str) {
        let msg = format!("expected {what}, found {}", describe(n.item));
        self.error(&n.span, &n.path, msg);
    }

    /// The node as a table, or an error.
    pub(super) fn table<'d>(&mut self, n: &Located<'d>) -> Option<Fields<'d>> {
        match n.item.table_like() {
            Some(t) => Some(Fields {
                table: Some(t),
                path: n.path.clone(),
                span: n.span.clone(),
                asked: Vec::new(),
            }),
            None => {
                self.mismatch(n, "a table");
                None
            }
        }
    }

    /// The node as a list of tables (`[[name]]` or an array of inline tables).
    pub(super) fn tables<'d>(&mut self, n: &Located<'d>, what: &str) -> Option<Vec<Fields<'d>>> {
        let fields = |i: usize, t: &'d dyn TableLike, span: Span| Fields {
            table: Some(t),
            path: format!("{}[{i}]", n.path),
            span: span.or_else(|| n.span.clone()),
            asked: Vec::new(),
        };
        match n.item {
            Ref::Item(Item::ArrayOfTables(a)) => Some(
                a.iter()
                    .enumerate()
                    .map(|(i, t)| fields(i, t, t.span()))
                    .collect(),
            ),
            Ref::Item(Item::Value(Value::Array(a))) | Ref::Value(Value::Array(a)) => {
                let mut out = Vec::new();
                for (i, v) in a.iter().enumerate() {
                    match v.as_inline_table() {
                        Some(t) => out.push(fields(i, t, t.span())),
                        None => {
                            let msg = format!("expected a table, found {}", describe_value(v));
                            self.error(
                                &v.span().or(n.span.clone()),
                                &format!("{}[{i}]", n.path),
                                msg,
                            );
                        }
                    }
                }
                Some(out)
            }
            _ => {
                self.mismatch(n, what);
                None
            }
        }
    }

    /// The node as a list, converting each element with `each`. `None` when
    /// the node is not a list, or is empty and `non_empty` is set; elements
    /// that fail to convert are left out (their errors are recorded).
    pub(super) fn list<'d, T>(
        &mut self,
        n: &Located<'d>,
        what: &str,
        non_empty: bool,
        mut each: impl FnMut(&mut Self, &Located<'d>) -> Option<T>,
    ) -> Option<Vec<T>> {
        let Some(array) = n.item.value().and_then(Value::as_array) else {
            self.mismatch(n, what);
            return None;
        };
        if non_empty && array.is_empty() {
            self.mismatch(n, what);
            return None;
        }
        let mut out = Vec::with_capacity(array.len());
        for (i, v) in array.iter().enumerate() {
            let elem = Located {
                item: Ref::Value(v),
                span: v.span().or_else(|| n.span.clone()),
                path: format!("{}[{i}]", n.path),
            };
            if let Some(t) = each(self, &elem) {
                out.push(t);
            }
        }
        Some(out)
    }

    /// The node as a string, or an error naming `what` was expected.
    pub(super) fn str<'d>(&mut self, n: &Located<'d>, what: &str) -> Option<&'d str> {
        match n.item.as_str() {
            Some(s) => Some(s),
            None => {
                self.mismatch(n, what);
                None
            }
        }
    }

    /// A non-empty string.
    pub(super) fn string(&mut self, n: &Located<'_>, what: &str) -> Option<String> {
        let s = self.str(n, what)?;
        if s.is_empty() {
            self.mismatch(n, what);
            return None;
        }
        Some(s.to_string())
    }

    /// A boolean.
    pub(super) fn boolean(&mut self, n: &Located<'_>) -> Option<bool> {
        match n.item.value().and_then(|v| v.as_bool()) {
            Some(b) => Some(b),
            None => {
                self.mismatch(n, "true or false");
                None
            }
        }
    }

    /// A string parsed with `FromStr`.
    pub(super) fn parse<T: FromStr>(&mut self, n: &Located<'_>, what: &str) -> Option<T> {
        let s = self.str(n, what)?;
        match s.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                self.mismatch(n, what);
                None
            }
        }
    }

    /// An integer within `min..=max`.
    pub(super) fn int(&mut self, n: &Located<'_>, min: i64, max: i64) -> Option<i64> {
        let what = if max == i64::MAX {
            format!("an integer >= {min}")
        } else {
            format!("an integer from {min} to {max}")
        };
        match n.item.value().and_then(Value::as_integer) {
            Some(v) if (min..=max).contains(&v) => Some(v),
            _ => {
                self.mismatch(n, &what);
                None
            }
        }
    }

    /// A humantime duration string greater than zero.
    pub(super) fn duration(&mut self, n: &Located<'_>) -> Option<Duration> {
        const WHAT: &str = "a duration like \"30s\"";
        let s = self.str(n, WHAT)?;
        match humantime::parse_duration(s) {
            Ok(d) if d.is_zero() => {
                self.mismatch(n, "a duration greater than zero");
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                let msg = format!("expected {WHAT}, found {} ({e})", describe(n.item));
                self.error(&n.span, &n.path, msg);
                None
            }
        }
    }

    /// A size in bytes: a string like "50MiB" or an integer, at least `min`.
    pub(super) fn size(&mut self, n: &Located<'_>, min: u64) -> Option<u64> {
        const WHAT: &str = "a size like \"50MiB\" or a number of bytes";
        let bytes = match n.item.value() {
            Some(Value::Integer(i)) => u64::try_from(*i.value()).ok(),
            Some(Value::String(s)) => bytesize::ByteSize::from_str(s.value().trim())
                .ok()
                .map(|b| b.as_u64()),
            _ => None,
        };
        match bytes {
            None => {
                self.mismatch(n, WHAT);
                None
            }
            Some(b) if b < min => {
                let what = if min % 1024 == 0 {
                    format!("a size of at least {}KiB", min / 1024)
                } else {
                    format!("a size of at least {min} bytes")
                };
                let msg = format!("expected {what}, found {} ({b} bytes)", describe(n.item));
                self.error(&n.span, &n.path, msg);
                None
            }
            Some(b) => Some(b),
        }
    }

    /// A socket address; port 0 only when `allow_port_zero`.
    pub(super) fn socket_addr(
        &mut self,
        n: &Located<'_>,
        allow_port_zero: bool,
    ) -> Option<SocketAddr> {
        const WHAT: &str = "a socket address like \"127.0.0.1:2525\" or \"[::1]:2525\"";
        let addr: SocketAddr = self.parse(n, WHAT)?;
        if addr.port() == 0 && !allow_port_zero {
            self.mismatch(n, "a socket address with a non-zero port");
            return None;
        }
        Some(addr)
    }

    /// An IP address.
    pub(super) fn ip(&mut self, n: &Located<'_>) -> Option<IpAddr> {
        self.parse(n, "an IP address like \"198.18.0.100\"")
    }

    /// A CIDR network; a bare address is a single-host network. Host bits
    /// are cleared, so "10.1.2.3/8" means 10.0.0.0/8.
    pub(super) fn cidr(&mut self, n: &Located<'_>) -> Option<IpNet> {
        const WHAT: &str = "a network like \"127.0.0.0/8\" or an IP address";
        let s = self.str(n, WHAT)?;
        let net = IpNet::from_str(s)
            .ok()
            .or_else(|| IpAddr::from_str(s).ok().map(IpNet::from));
        match net {
            Some(net) => Some(net.trunc()),
            None => {
                self.mismatch(n, WHAT);
                None
            }
        }
    }

    /// One of a fixed set of strings.
    pub(super) fn choice<T: Copy>(&mut self, n: &Located<'_>, options: &[(&str, T)]) -> Option<T> {
        let mut what = String::from("one of ");
        for (i, (name, _)) in options.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(what, "{sep}\"{name}\"");
        }
        let s = self.str(n, &what)?;
        match options.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Some(*v),
            None => {
                self.mismatch(n, &what);
                None
            }
        }
    }
}

impl<'d> Fields<'d> {
    /// The document root.
    pub(super) fn root(table: &'d dyn TableLike) -> Self {
        Fields {
            table: Some(table),
            path: String::new(),
            span: None,
            asked: Vec::new(),
        }
    }

    /// An optional table that is not in the file: every key reads as absent.
    pub(super) fn absent(path: &str) -> Self {
        Fields {
            table: None,
            path: path.to_string(),
            span: None,
            asked: Vec::new(),
        }
    }

    /// Path of a key in this table.
    pub(super) fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Takes `key` if present; either way it is now a known key.
    pub(super) fn take(&mut self, key: &'static str) -> Option<Located<'d>> {
        self.asked.push(key);
        let (k, item) = self.table?.get_key_value(key)?;
        Some(Located {
            item: Ref::Item(item),
            span: item
                .span()
                .or_else(|| k.span())
                .or_else(|| self.span.clone()),
            path: self.child_path(key),
        })
    }

    /// Takes `key`, recording an error at the table header when it is missing.
    pub(super) fn require(&mut self, ctx: &mut Ctx<'_>, key: &'static str) -> Option<Located<'d>> {
        let n = self.take(key);
        if n.is_none() {
            let path = self.child_path(key);
            ctx.error(&self.span, &path, format!("missing required key \"{key}\""));
        }
        n
    }

    /// Reports every key that was never asked for.
    pub(super) fn finish(self, ctx: &mut Ctx<'_>) {
        let Some(table) = self.table else { return };
        for (key, item) in table.iter() {
            if self.asked.contains(&key) {
                continue;
            }
            let span = table
                .key(key)
                .and_then(|k| k.span())
                .or_else(|| item.span())
                .or_else(|| self.span.clone());
            let mut msg = format!("unknown key \"{key}\"");
            if let Some(near) = self.asked.iter().find(|k| edit_distance(k, key) <= 2) {
                let _ = write!(msg, " (did you mean \"{near}\"?)");
            }
            ctx.error(&span, &self.child_path(key), msg);
        }
    }
}

/// What an item is, for "found …" in messages.
fn describe(item: Ref<'_>) -> String {
    match item {
        Ref::Value(v) | Ref::Item(Item::Value(v)) => describe_value(v),
        Ref::Item(Item::None) => "nothing".to_string(),
        Ref::Item(Item::Table(_)) => "a table".to_string(),
        Ref::Item(Item::ArrayOfTables(_)) => "an array of tables".to_string(),
    }
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string {:?}", s.value()),
        Value::Integer(i) => format!("integer {}", i.value()),
        Value::Float(f) => format!("float {}", f.value()),
        Value::Boolean(b) => format!("boolean {}", b.value()),
        Value::Datetime(d) => format!("datetime {}", d.value()),
        Value::Array(a) if a.is_empty() => "an empty list".to_string(),
        Value::Array(_) => "a list".to_string(),
        Value::InlineTable(_) => "a table".to_string(),
    }
}

/// Levenshtein distance, for "did you mean" hints on short key names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// An optional integer in `min..=max`, or `default`.
pub(super) fn int_or(
    ctx: &mut Ctx<'_>,
    f: &mut Fields<'_>,
    key: &'static str,
    min: i64,
    max: i64,
    default: i64,
) -> i64 {
    f.take(key)
        .and_then(|n| ctx.int(&n, min, max))
        .unwrap_or(default)
}

/// An optional duration with a default in seconds.
pub(super) fn duration_or(
    ctx: &mut Ctx<'_>,
    f: &mut Fields<'_>,
    key: &'static str,
    default_secs: u64,
) -> Duration {
    duration_or_else(ctx, f, key, Duration::from_secs(default_secs))
}

/// A plausible domain name, lower-cased, without a trailing dot.
pub(super) fn domain(ctx: &mut Ctx<'_>, n: &Located<'_>, what: &str) -> Option<String> {
    let s = ctx.str(n, what)?;
    let d = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if is_domain(&d) {
        Some(d)
    } else {
        ctx.mismatch(n, what);
        None
    }
}

/// LDH labels of 1..=63 characters, 253 in all, and a last label that is
/// not all digits (that would be an IP address, not a name).
fn is_domain(d: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(label_ok)
        && !d
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// An optional duration with a default in milliseconds.
pub(super) fn ms_or(
    ctx: &mut Ctx<'_>,
    f: &mut Fields<'_>,
    key: &'static str,
    default_ms: u64,
) -> Duration {
    duration_or_else(ctx, f, key, Duration::from_millis(default_ms))
}

fn duration_or_else(
    ctx: &mut Ctx<'_>,
    f: &mut Fields<'_>,
    key: &'static str,
    default: Duration,
) -> Duration {
    f.take(key)
        .and_then(|n| ctx.duration(&n))
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("listen", "listn"), 1);
        assert_eq!(edit_distance("route", "routes"), 1);
        assert_eq!(edit_distance("abc", "xyz"), 3);
    }
}
