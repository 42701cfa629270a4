//! The configuration a reload may change, published to the parts that
//! read it. Each reads the current value when it starts a piece of work —
//! a session, an association, a routing decision — so a reload never
//! drops a connection or a message: work in progress finishes on the
//! configuration it started with.

use std::sync::Arc;

use tokio::sync::watch;

use super::{Config, DeliveryConfig, SmtpConfig};

/// The current configuration, whole and by section.
pub struct Live {
    whole: watch::Sender<Arc<Config>>,
    smtp: watch::Sender<Arc<SmtpConfig>>,
    delivery: watch::Sender<Arc<DeliveryConfig>>,
}

impl Live {
    /// Start from `cfg`.
    pub fn new(cfg: Config) -> Live {
        Live {
            smtp: watch::Sender::new(Arc::new(cfg.smtp.clone())),
            delivery: watch::Sender::new(Arc::new(cfg.delivery.clone())),
            whole: watch::Sender::new(Arc::new(cfg)),
        }
    }

    /// The whole configuration, as it changes.
    pub fn config(&self) -> watch::Receiver<Arc<Config>> {
        self.whole.subscribe()
    }

    /// `[smtp]`, as it changes.
    pub fn smtp(&self) -> watch::Receiver<Arc<SmtpConfig>> {
        self.smtp.subscribe()
    }

    /// `[delivery]`, as it changes.
    pub fn delivery(&self) -> watch::Receiver<Arc<DeliveryConfig>> {
        self.delivery.subscribe()
    }

    /// The configuration now.
    pub fn current(&self) -> Arc<Config> {
        self.whole.borrow().clone()
    }

    /// Switch to `new`, if nothing in it needs a restart; returns the
    /// sections that changed, or every reason it was refused.
    pub fn apply(&self, new: Config) -> Result<Vec<&'static str>, Vec<String>> {
        let old = self.current();
        let refused = needs_restart(&old, &new);
        if !refused.is_empty() {
            return Err(refused);
        }
        let mut changed = Vec::new();
        if old.smtp != new.smtp {
            changed.push("smtp");
        }
        // Published even when equal if it names a certificate: listeners
        // reload the certificate for a new configuration, and a renewed
        // certificate comes with the same file names.
        if old.smtp != new.smtp || new.smtp.tls.is_some() {
            self.smtp.send_replace(Arc::new(new.smtp.clone()));
        }
        if old.delivery != new.delivery {
            changed.push("delivery");
            self.delivery.send_replace(Arc::new(new.delivery.clone()));
        }
        if old.routes != new.routes {
            changed.push("route");
        }
        if old.log != new.log {
            changed.push("log");
        }
        self.whole.send_replace(Arc::new(new));
        Ok(changed)
    }
}

/// What differs between `old` and `new` that only a restart can apply.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut why = Vec::new();
    let mut differs = |field: &str, same: bool| {
        if !same {
            why.push(format!("{field} changed: that needs a restart"));
        }
    };
    differs("node.name", old.node.name == new.node.name);
    differs("node.data_dir", old.node.data_dir == new.node.data_dir);
    differs("smtp.listen", old.smtp.listen == new.smtp.listen);
    let implicit = |c: &Config| c.smtp.tls.as_ref().map(|t| t.implicit_listen.clone());
    differs(
        "smtp.tls.implicit_listen",
        implicit(old).unwrap_or_default() == implicit(new).unwrap_or_default(),
    );
    differs("smtp.backlog", old.smtp.backlog == new.smtp.backlog);
    differs("smtp.hostname", old.smtp.hostname == new.smtp.hostname);
    differs("log.format", old.log.format == new.log.format);
    differs("[spool]", old.spool == new.spool);
    differs("[cluster]", old.cluster == new.cluster);
    differs("[admin]", old.admin == new.admin);
    differs("[[group]]", old.groups == new.groups);
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "[node]\nname = \"n\"\ndata_dir = \"d\"\n{extra}\n\
             [[route]]\ndomains = [\"*\"]\ndrop_dir = \"out\"\n"
        );
        super::super::load_str(&text, "t.toml").unwrap()
    }

    #[test]
    fn live_sections_change_and_are_published() {
        let live = Live::new(cfg(""));
        let mut smtp = live.smtp();
        let delivery = live.delivery();
        let changed = live
            .apply(cfg("[smtp]\nmax_recipients = 7\n[log]\nlevel = \"debug\""))
            .unwrap();
        assert_eq!(changed, ["smtp", "log"]);
        assert!(smtp.has_changed().unwrap());
        assert_eq!(smtp.borrow_and_update().max_recipients, 7);
        assert!(
            !delivery.has_changed().unwrap(),
            "untouched sections stay quiet"
        );
        assert_eq!(live.current().log.level, "debug");
        assert_eq!(
            live.apply(cfg("[smtp]\nmax_recipients = 7\n[log]\nlevel = \"debug\"")),
            Ok(vec![])
        );
    }

    #[test]
    fn restart_only_changes_refuse_the_whole_reload() {
        let live = Live::new(cfg(""));
        let err = live
            .apply(cfg(
                "[smtp]\nmax_recipients = 7\nlisten = [\"127.0.0.1:2600\"]",
            ))
            .unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert!(err[0].starts_with("smtp.listen"), "{err:?}");
        assert_ne!(live.current().smtp.max_recipients, 7, "nothing applied");
        let mut renamed = cfg("");
        renamed.node.name = "m".into();
        renamed.node.data_dir = "e".into();
        assert_eq!(live.apply(renamed).unwrap_err().len(), 2);
    }
}
