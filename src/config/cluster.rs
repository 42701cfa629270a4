//! `[cluster]`: who this node's peers are and how it joins them.

use std::path::PathBuf;
use std::time::Duration;

use super::reader::{ms_or, Ctx, Fields, Located};
use super::{ClusterConfig, ClusterRole};

/// `[cluster]` with its defaults; timings are checked against each other
/// so a cluster cannot be configured to elect leaders in a loop.
pub(super) fn read_cluster(ctx: &mut Ctx<'_>, mut f: Fields<'_>) -> ClusterConfig {
    let name = f
        .require(ctx, "name")
        .and_then(|n| name(ctx, &n))
        .unwrap_or_default();
    let listen = f
        .require(ctx, "listen")
        .and_then(|n| ctx.socket_addr(&n, false));
    let seeds = f
        .take("seeds")
        .and_then(|n| {
            let what = "a list of cluster addresses like [\"198.18.0.2:7400\"]";
            ctx.list(&n, what, false, |ctx, e| ctx.socket_addr(e, false))
        })
        .unwrap_or_default();
    let secret_file = f
        .require(ctx, "secret_file")
        .and_then(|n| ctx.string(&n, "a file path like \"cluster.key\""))
        .unwrap_or_default();
    let accept_secret_files = f
        .take("accept_secret_files")
        .and_then(|n| {
            let what = "a list of file paths like [\"old-cluster.key\"]";
            ctx.list(&n, what, false, |ctx, e| {
                ctx.string(e, "a file path like \"old-cluster.key\"")
                    .map(PathBuf::from)
            })
        })
        .unwrap_or_default();
    let role = f
        .take("role")
        .and_then(|n| {
            let options = [
                ("member", ClusterRole::Member),
                ("witness", ClusterRole::Witness),
            ];
            ctx.choice(&n, &options)
        })
        .unwrap_or(ClusterRole::Member);
    let max_voters = f
        .take("max_voters")
        .and_then(|n| ctx.int(&n, 1, 9))
        .unwrap_or(5) as usize;
    let heartbeat_interval = ms_or(ctx, &mut f, "heartbeat_interval", 100);
    let election_node = f.take("election_timeout");
    let election_timeout = election_node
        .as_ref()
        .and_then(|n| ctx.duration(n))
        .unwrap_or(Duration::from_millis(500));
    if election_timeout < heartbeat_interval * 3 {
        let (span, path) = match &election_node {
            Some(n) => (n.span.clone(), n.path.clone()),
            None => (f.span.clone(), f.child_path("election_timeout")),
        };
        let msg = format!(
            "must be at least 3 x heartbeat_interval ({heartbeat_interval:?}), \
             or followers call elections while the leader is healthy"
        );
        ctx.error(&span, &path, msg);
    }
    let join_backoff_min = ms_or(ctx, &mut f, "join_backoff_min", 100);
    let join_backoff_max = ms_or(ctx, &mut f, "join_backoff_max", 10_000);
    let join_timeout = ms_or(ctx, &mut f, "join_timeout", 30_000);
    if join_backoff_max < join_backoff_min {
        let span = f.span.clone();
        let path = f.child_path("join_backoff_max");
        ctx.error(&span, &path, "must not be below join_backoff_min");
    }
    f.finish(ctx);
    ClusterConfig {
        name,
        listen: listen.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()),
        seeds,
        secret_file: secret_file.into(),
        accept_secret_files,
        role,
        max_voters,
        heartbeat_interval,
        election_timeout,
        join_backoff_min,
        join_backoff_max,
        join_timeout,
        // Set from the [[group]]s once they are read.
    }
}

fn name(ctx: &mut Ctx<'_>, n: &Located<'_>) -> Option<String> {
    let what = "a cluster name of letters, digits, '.', '_' or '-' like \"prod\"";
    let s = ctx.string(n, what)?;
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Some(s)
    } else {
        ctx.mismatch(n, what);
        None
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{load_str, ClusterRole, ConfigErrors};
    use std::time::Duration;

    const BASE: &str = "[node]\nname = \"a\"\ndata_dir = \"d\"\n\
                        [[route]]\ndomains = [\"*\"]\ndrop_dir = \"o\"\n";

    fn errors(cluster: &str) -> Vec<String> {
        match load_str(&format!("{BASE}[cluster]\n{cluster}"), "c.toml") {
            Ok(_) => Vec::new(),
            Err(ConfigErrors(e)) => e
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect(),
        }
    }

    #[test]
    fn a_full_cluster_section_loads_with_defaults() {
        let text = format!(
            "{BASE}[cluster]\nname = \"prod\"\nlisten = \"127.0.0.11:7400\"\n\
             seeds = [\"127.0.0.12:7400\"]\nsecret_file = \"cluster.key\"\n"
        );
        let c = load_str(&text, "c.toml").unwrap().cluster.unwrap();
        assert_eq!(c.name, "prod");
        assert_eq!(c.listen, "127.0.0.11:7400".parse().unwrap());
        assert_eq!(c.seeds, vec!["127.0.0.12:7400".parse().unwrap()]);
        assert_eq!(c.role, ClusterRole::Member);
        assert_eq!(c.max_voters, 5);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(c.election_timeout, Duration::from_millis(500));
    }

    #[test]
    fn no_cluster_section_means_a_single_node() {
        assert!(load_str(BASE, "c.toml").unwrap().cluster.is_none());
    }

    #[test]
    fn required_keys_are_reported_together() {
        let e = errors("name = \"prod\"\n");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("cluster.listen: missing"), "{e:?}");
        assert!(e[1].starts_with("cluster.secret_file: missing"), "{e:?}");
    }

    #[test]
    fn witness_role_and_bad_values() {
        let ok = "name = \"p\"\nlisten = \"127.0.0.1:7400\"\nsecret_file = \"k\"\n";
        assert!(errors(&format!("{ok}role = \"witness\"\n")).is_empty());
        let e = errors(&format!(
            "{ok}role = \"boss\"\nmax_voters = 12\nseeds = [\"nowhere\"]\n"
        ));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e.iter().any(|e| e.starts_with("cluster.role")));
        assert!(e.iter().any(|e| e.starts_with("cluster.max_voters")));
        assert!(e.iter().any(|e| e.starts_with("cluster.seeds[0]")));
    }

    #[test]
    fn secrets_also_accepted_are_a_list_of_files() {
        let ok = "name = \"p\"\nlisten = \"127.0.0.1:7400\"\nsecret_file = \"k\"\n";
        let text = format!("{BASE}[cluster]\n{ok}accept_secret_files = [\"old.key\"]\n");
        let c = load_str(&text, "c.toml").unwrap().cluster.unwrap();
        assert_eq!(c.accept_secret_files, [std::path::PathBuf::from("old.key")]);
        let e = errors(&format!("{ok}accept_secret_files = \"old.key\"\n"));
        assert!(e[0].starts_with("cluster.accept_secret_files"), "{e:?}");
        let e = errors(&format!("{ok}accept_secret_files = [7]\n"));
        assert!(e[0].starts_with("cluster.accept_secret_files[0]"), "{e:?}");
    }

    #[test]
    fn an_election_timeout_too_close_to_the_heartbeat_is_refused() {
        let ok = "name = \"p\"\nlisten = \"127.0.0.1:7400\"\nsecret_file = \"k\"\n";
        let e = errors(&format!(
            "{ok}heartbeat_interval = \"200ms\"\nelection_timeout = \"400ms\"\n"
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("cluster.election_timeout: must be at least 3 x"),
            "{e:?}"
        );
        let e = errors(&format!(
            "{ok}join_backoff_min = \"5s\"\njoin_backoff_max = \"1s\"\n"
        ));
        assert!(e[0].starts_with("cluster.join_backoff_max"), "{e:?}");
    }
}

#[cfg(test)]
mod example_tests {
    use crate::config::load_str;

    #[test]
    fn the_shipped_demo_cluster_configs_load() {
        for (file, text) in [
            ("node-a.toml", include_str!("../../config/node-a.toml")),
            ("node-b.toml", include_str!("../../config/node-b.toml")),
            ("node-c.toml", include_str!("../../config/node-c.toml")),
            ("witness.toml", include_str!("../../config/witness.toml")),
        ] {
            let c = load_str(text, file).unwrap_or_else(|e| panic!("{e}"));
            let cluster = c.cluster.expect("a cluster section");
            assert_eq!(cluster.name, "demo");
            assert_eq!(cluster.seeds.len(), 3);
        }
    }
}
