//! Reloading the configuration (SIGHUP or `mtad ctl reload`): read the
//! file again, validate all of it, apply what can change live. An invalid
//! file keeps the running configuration and says why — every error, with
//! file, line and field; a change only a restart applies keeps its running
//! value and is reported as a warning, at its file, line and field, while
//! the rest of the file applies.

use std::path::Path;

use crate::admin::ReloadOutcome as Outcome;
use crate::app::Node;
use crate::events::Logging;
use crate::notify;

/// Reload `node` from `path`; the service manager hears RELOADING, then
/// READY again.
pub fn reload(node: &Node, path: &Path, logging: &Logging) -> Outcome {
    notify::reloading();
    let outcome = match crate::config::load_file(path) {
        Err(errors) => Outcome {
            changed: Vec::new(),
            errors: errors.0.iter().map(|e| e.to_string()).collect(),
            warnings: Vec::new(),
        },
        Ok(cfg) => {
            let level = cfg.log.level.clone();
            // A certificate or password file that does not load would
            // leave new sessions without STARTTLS or AUTH: keep the
            // running configuration instead.
            let problems = crate::smtp::check_files(&cfg.smtp);
            if problems.is_empty() {
                let applied = node.reload(cfg);
                if applied.changed.contains(&"log") {
                    if let Err(e) = logging.set_level(&level) {
                        tracing::error!(%level, error = %e, "log level not changed");
                    }
                }
                Outcome {
                    changed: applied.changed.into_iter().map(String::from).collect(),
                    errors: Vec::new(),
                    warnings: kept(path, &applied.kept),
                }
            } else {
                Outcome {
                    changed: Vec::new(),
                    errors: problems.iter().map(|p| p.to_string()).collect(),
                    warnings: Vec::new(),
                }
            }
        }
    };
    if outcome.errors.is_empty() {
        let changed = outcome.changed.join(",");
        tracing::info!(file = %path.display(), %changed, "configuration reloaded");
        for w in &outcome.warnings {
            tracing::warn!(file = %path.display(), warning = %w, "reload kept a setting only a restart changes");
        }
    } else {
        for e in &outcome.errors {
            tracing::error!(file = %path.display(), error = %e, "reload refused: the running configuration stays");
        }
    }
    notify::ready();
    outcome
}

/// The settings `kept` at their running values, each as
/// `FILE:LINE:COL: FIELD: ...` at its place in `path`.
fn kept(path: &Path, kept: &[&str]) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let problems: Vec<crate::config::FileProblem> = kept
        .iter()
        .map(|field| crate::config::FileProblem {
            field: field.to_string(),
            message: "changed, but only a restart applies it: the running value stays".into(),
        })
        .collect();
    let file = path.display().to_string();
    let located = crate::config::file_errors(&text, &file, &problems);
    located.0.iter().map(|e| e.to_string()).collect()
}
