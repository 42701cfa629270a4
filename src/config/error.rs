//! What a configuration file got wrong: each problem with its file, line,
//! column and field, so that one run reports every one of them.

use std::fmt;

/// One problem in a configuration file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File name as given to the loader.
    pub file: String,
    /// 1-based line; 0 when the error is about the file as a whole.
    pub line: usize,
    /// 1-based column in characters; 0 when `line` is 0.
    pub column: usize,
    /// Dotted path such as `delivery.retry[2]`; empty for syntax errors.
    pub field: String,
    /// What was expected and what was found.
    pub message: String,
}

/// Every problem found in one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file)?;
        if self.line > 0 {
            write!(f, "{}:{}:", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, " {}:", self.field)?;
        }
        write!(f, " {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A file the configuration names that does not load (a certificate, a
/// secret): which field names it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    /// Dotted path of the field, as in [`ConfigError::field`].
    pub field: String,
    /// What is wrong with the file.
    pub message: String,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// `problems` as configuration errors of `file` (whose text is `text`),
/// each at the line and column of its field, in file order.
pub fn file_errors(text: &str, file: &str, problems: &[FileProblem]) -> ConfigErrors {
    let doc = toml_edit::Document::parse(text).ok();
    let mut errors: Vec<ConfigError> = problems
        .iter()
        .map(|p| {
            let at = doc
                .as_ref()
                .and_then(|d| locate(text, d.as_item(), &p.field));
            let (line, column) = at.unwrap_or((0, 0));
            ConfigError {
                file: file.to_string(),
                line,
                column,
                field: p.field.clone(),
                message: p.message.clone(),
            }
        })
        .collect();
    errors.sort_by_key(|e| (e.line, e.column));
    ConfigErrors(errors)
}

/// Line and column of the value at dotted `field` (`a.b[2]`) under `item`.
fn locate(text: &str, mut item: &toml_edit::Item, field: &str) -> Option<(usize, usize)> {
    let mut span = None;
    for segment in field.split('.') {
        let (key, index) = match segment.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let table = item.as_table_like()?;
        let (k, next) = table.get_key_value(key)?;
        span = next.span().or_else(|| k.span()).or(span);
        item = next;
        if let Some(i) = index {
            let value = item.as_array()?.get(i)?;
            span = value.span().or(span);
            return span.map(|s| position(text, s.start));
        }
    }
    span.map(|s| position(text, s.start))
}

/// 1-based line and column (in characters) of byte `offset` in `src`.
pub(super) fn position(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters() {
        let src = "ab\nçd = 1\n";
        assert_eq!(position(src, 0), (1, 1));
        assert_eq!(position(src, 3), (2, 1));
        // 'ç' is two bytes but one column.
        assert_eq!(position(src, 6), (2, 3));
        assert_eq!(position(src, 999), (3, 1));
    }
}
