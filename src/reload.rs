//! Reloading the configuration (SIGHUP or `mtad ctl reload`): read the
//! file again, validate all of it, apply what can change live. An invalid
//! file, or one that changes what only a restart can, keeps the running
//! configuration and says why — every error, with file, line and field.

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
        },
        Ok(cfg) => {
            let level = cfg.log.level.clone();
            // A certificate or password file that does not load would
            // leave new sessions without STARTTLS or AUTH: keep the
            // running configuration instead.
            let problems = crate::smtp::check_files(&cfg.smtp);
            let applied = match problems.is_empty() {
                false => Err(problems.iter().map(|p| p.to_string()).collect()),
                true => node.reload(cfg),
            };
            match applied {
                Ok(changed) => {
                    if changed.contains(&"log") {
                        if let Err(e) = logging.set_level(&level) {
                            tracing::error!(%level, error = %e, "log level not changed");
                        }
                    }
                    Outcome {
                        changed: changed.into_iter().map(String::from).collect(),
                        errors: Vec::new(),
                    }
                }
                Err(errors) => Outcome {
                    changed: Vec::new(),
                    errors,
                },
            }
        }
    };
    if outcome.errors.is_empty() {
        tracing::info!(file = %path.display(), changed = ?outcome.changed, "configuration reloaded");
    } else {
        for e in &outcome.errors {
            tracing::error!(file = %path.display(), error = %e, "reload refused: the running configuration stays");
        }
    }
    notify::ready();
    outcome
}
