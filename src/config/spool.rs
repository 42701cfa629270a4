//! `[spool]`: how large the spool may grow, and how many copies of a
//! message must be durable (here and on other members) before "250".

use super::reader::{Ctx, Fields};
use super::{SpoolConfig, SpoolSize};

/// Most copies of one message: one per node of the largest cluster.
pub const MAX_REPLICAS: u8 = 9;

/// `[spool]` with its defaults; `clustered` when there is a `[cluster]`,
/// where a message is copied to one other member by default.
pub(super) fn read_spool(ctx: &mut Ctx<'_>, mut f: Fields<'_>, clustered: bool) -> SpoolConfig {
    let mut spool = SpoolConfig::standalone();
    if clustered {
        spool.replicas = 2;
    }
    if let Some(n) = f.take("max_size") {
        let percent = n.item.as_str().and_then(|s| s.trim().strip_suffix('%'));
        let size = match percent {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Some(SpoolSize::Percent(p)),
                _ => {
                    ctx.mismatch(&n, "a share of the filesystem from \"1%\" to \"100%\"");
                    None
                }
            },
            // A few messages at least.
            None => ctx.size(&n, 1 << 20).map(SpoolSize::Bytes),
        };
        if let Some(size) = size {
            spool.max_size = size;
        }
    }
    if let Some(n) = f.take("replicas") {
        if let Some(r) = ctx.int(&n, 1, i64::from(MAX_REPLICAS)) {
            spool.replicas = r as u8;
        }
    }
    if let Some(n) = f.take("min_replicas") {
        if let Some(m) = ctx.int(&n, 1, i64::from(MAX_REPLICAS)) {
            spool.min_replicas = m as u8;
            // More copies required than made: every message would be
            // refused.
            if spool.min_replicas > spool.replicas {
                let msg = format!(
                    "min_replicas ({m}) must not exceed replicas ({})",
                    spool.replicas
                );
                ctx.error(&n.span, &n.path, msg);
            }
        }
    }
    f.finish(ctx);
    spool
}

#[cfg(test)]
mod tests {
    use crate::config::{load_str, ConfigError};

    const MIN: &str = "[node]\nname = \"n1\"\ndata_dir = \"./d\"\n\n\
        [[route]]\ndomains = [\"*\"]\ndrop_dir = \"./out\"\n";
    const CLUSTER: &str = "[cluster]\nname = \"c\"\nlisten = \"127.0.0.1:7400\"\n\
        secret_file = \"k\"\n";

    fn spool(extra: &str) -> (u8, u8) {
        let c = load_str(&format!("{MIN}{extra}"), "t.toml").unwrap_or_else(|e| panic!("{e}"));
        (c.spool.replicas, c.spool.min_replicas)
    }

    fn errors(extra: &str) -> Vec<ConfigError> {
        match load_str(&format!("{MIN}{extra}"), "t.toml") {
            Ok(c) => panic!("loaded {:?}", c.spool),
            Err(e) => e.0,
        }
    }

    #[test]
    fn one_copy_alone_two_in_a_cluster_by_default() {
        assert_eq!(spool(""), (1, 1));
        assert_eq!(spool(CLUSTER), (2, 1));
        assert_eq!(spool(&format!("{CLUSTER}[spool]\nreplicas = 3\n")), (3, 1));
        let text = format!("{CLUSTER}[spool]\nreplicas = 3\nmin_replicas = 3\n");
        assert_eq!(spool(&text), (3, 3));
    }

    #[test]
    fn counts_out_of_range_are_errors_with_file_line_and_field() {
        // MIN has 7 lines: [spool] is line 8, its first key line 9.
        for (text, field, msg) in [
            ("replicas = 0", "spool.replicas", "from 1 to 9"),
            ("replicas = 10", "spool.replicas", "from 1 to 9"),
            ("replicas = \"2\"", "spool.replicas", "from 1 to 9"),
            ("min_replicas = 0", "spool.min_replicas", "from 1 to 9"),
            ("min_replicas = 2", "spool.min_replicas", "must not exceed"),
        ] {
            let errs = errors(&format!("[spool]\n{text}\n"));
            assert_eq!(errs.len(), 1, "{text}: {errs:?}");
            let e = &errs[0];
            assert_eq!(
                (e.file.as_str(), e.line, e.field.as_str()),
                ("t.toml", 9, field)
            );
            assert!(e.message.contains(msg), "{text}: {e}");
        }
        // Against the cluster's default of 2 as well.
        let errs = errors(&format!("{CLUSTER}[spool]\nmin_replicas = 3\n"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (errs[0].line, errs[0].field.as_str()),
            (13, "spool.min_replicas")
        );
    }
}
