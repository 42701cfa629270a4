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

    /// Switch to `new`, except for what only a restart applies: those
    /// settings keep their running values. Returns what changed and what
    /// was kept.
    pub fn apply(&self, mut new: Config) -> Applied {
        let old = self.current();
        let kept = keep_running(&old, &mut new);
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
        if old.node != new.node {
            changed.push("node");
        }
        self.whole.send_replace(Arc::new(new));
        Applied { changed, kept }
    }
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The sections that changed.
    pub changed: Vec<&'static str>,
    /// Settings the file changed that only a restart applies (dotted
    /// paths as in the file): they keep their running values.
    pub kept: Vec<&'static str>,
}

/// Put back in `new` the running value (from `old`) of every setting that
/// only a restart applies; the fields that differed.
pub fn keep_running(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    fn keep<T: PartialEq + Clone>(
        kept: &mut Vec<&'static str>,
        field: &'static str,
        old: &T,
        new: &mut T,
    ) {
        if old != new {
            kept.push(field);
            *new = old.clone();
        }
    }
    keep(&mut kept, "node.name", &old.node.name, &mut new.node.name);
    keep(
        &mut kept,
        "node.data_dir",
        &old.node.data_dir,
        &mut new.node.data_dir,
    );
    keep(
        &mut kept,
        "smtp.listen",
        &old.smtp.listen,
        &mut new.smtp.listen,
    );
    let implicit = |c: &Config| {
        c.smtp
            .tls
            .as_ref()
            .map(|t| t.implicit_listen.clone())
            .unwrap_or_default()
    };
    if implicit(old) != implicit(new) {
        kept.push("smtp.tls.implicit_listen");
        // The listeners stay as they are; without a certificate now they
        // close what connects.
        if let Some(t) = new.smtp.tls.as_mut() {
            t.implicit_listen = implicit(old);
        }
    }
    keep(
        &mut kept,
        "smtp.backlog",
        &old.smtp.backlog,
        &mut new.smtp.backlog,
    );
    keep(
        &mut kept,
        "smtp.hostname",
        &old.smtp.hostname,
        &mut new.smtp.hostname,
    );
    keep(
        &mut kept,
        "log.format",
        &old.log.format,
        &mut new.log.format,
    );
    keep(&mut kept, "spool", &old.spool, &mut new.spool);
    keep(&mut kept, "cluster", &old.cluster, &mut new.cluster);
    keep(&mut kept, "admin", &old.admin, &mut new.admin);
    keep(&mut kept, "group", &old.groups, &mut new.groups);
    keep(&mut kept, "dns", &old.dns, &mut new.dns);
    kept
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
        let applied = live.apply(cfg("[smtp]\nmax_recipients = 7\n[log]\nlevel = \"debug\""));
        assert_eq!(applied.changed, ["smtp", "log"]);
        assert!(applied.kept.is_empty());
        assert!(smtp.has_changed().unwrap());
        assert_eq!(smtp.borrow_and_update().max_recipients, 7);
        assert!(
            !delivery.has_changed().unwrap(),
            "untouched sections stay quiet"
        );
        assert_eq!(live.current().log.level, "debug");
        let again = live.apply(cfg("[smtp]\nmax_recipients = 7\n[log]\nlevel = \"debug\""));
        assert_eq!(again, Applied::default());
    }

    #[test]
    fn restart_only_changes_keep_their_running_values_and_the_rest_applies() {
        let live = Live::new(cfg(""));
        let applied = live.apply(cfg(
            "[smtp]\nmax_recipients = 7\nlisten = [\"127.0.0.1:2600\"]\nhostname = \"new.example\"",
        ));
        assert_eq!(applied.kept, ["smtp.listen", "smtp.hostname"]);
        assert_eq!(applied.changed, ["smtp"]);
        let now = live.current();
        assert_eq!(now.smtp.max_recipients, 7, "the live change applies");
        assert_eq!(now.smtp.listen, cfg("").smtp.listen, "the listeners stay");
        assert_eq!(now.smtp.hostname, cfg("").smtp.hostname);
        let mut renamed = cfg("");
        renamed.node.name = "m".into();
        renamed.node.data_dir = "e".into();
        assert_eq!(live.apply(renamed).kept, ["node.name", "node.data_dir"]);
        assert_eq!(live.current().node.name, "n");
    }
}
