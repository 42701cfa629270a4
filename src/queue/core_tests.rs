use super::*;
use crate::config::{
    DeliveryConfig, LogConfig, LogFormat, NodeConfig, Route, RouteTarget, SmtpConfig, TlsPolicy,
};
use crate::delivery::RcptResult;
use crate::spool::Recipient;

pub(crate) fn config() -> Config {
    let route = |domains: &[&str], target| {
        Arc::new(Route {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            target,
            source_address: None,
            tls: TlsPolicy::None,
            tls_ca: None,
            tls_name: None,
        })
    };
    Config {
        node: NodeConfig {
            name: "n".into(),
            data_dir: "/nonexistent".into(),
            shutdown_grace: Duration::from_secs(30),
        },
        smtp: SmtpConfig {
            listen: vec![],
            hostname: "mx.example.test".into(),
            backlog: 16,
            max_connections: 10,
            max_message_size: 1 << 20,
            receive_memory: 1 << 30,
            max_recipients: 100,
            max_commands_before_mail: 10,
            idle_timeout: Duration::from_secs(60),
            relay_networks: vec![],
            accept_domains: vec![],
            tls: None,
            limits: Default::default(),
            auth: None,
        },
        delivery: DeliveryConfig {
            association_threshold: 50,
            max_associations: 4,
            max_messages_per_association: 100,
            association_lifetime: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
            transaction_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(5),
            retry: vec![Duration::from_secs(60), Duration::from_secs(300)],
            max_queue_lifetime: Duration::from_secs(3600),
        },
        spool: Default::default(),
        routes: vec![
            route(
                &["a.example"],
                RouteTarget::Smtp(vec!["127.0.0.1:1".parse().unwrap()]),
            ),
            route(&["b.example"], RouteTarget::DropDir("/tmp/x".into())),
        ],
        log: LogConfig {
            format: LogFormat::Json,
            level: "info".into(),
        },
        cluster: None,
        admin: None,
        groups: vec![],
        dns: Default::default(),
    }
}

fn envelope(rcpts: &[&str]) -> Envelope {
    message(1, rcpts)
}

/// Message `id` (arrived at 1,000,000 + id ms) to `rcpts`, all pending.
pub(crate) fn message(id: u64, rcpts: &[&str]) -> Envelope {
    Envelope {
        id: QueueId(id),
        sender: "s@example.test".into(),
        recipients: rcpts
            .iter()
            .map(|a| Recipient {
                address: a.to_string(),
                state: RcptState::Pending { attempts: 0 },
            })
            .collect(),
        arrived_ms: 1_000_000 + id,
        holders: Vec::new(),
    }
}

pub(crate) fn jobs(out: &[Action]) -> Vec<(usize, Vec<usize>)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Dispatch { route, job, .. } => {
                Some((*route, job.recipients.iter().map(|r| r.index).collect()))
            }
            _ => None,
        })
        .collect()
}

fn result(results: &[(usize, Outcome)]) -> JobResult {
    JobResult {
        id: QueueId(1),
        route: 0,
        next_hop: "127.0.0.1:1".into(),
        results: results
            .iter()
            .map(|&(index, outcome)| RcptResult {
                index,
                outcome,
                reply: match outcome {
                    Outcome::Delivered => "250 2.0.0 ok",
                    Outcome::Deferred => "451 4.3.0 later",
                    Outcome::Failed => "550 5.1.1 no such user",
                }
                .into(),
            })
            .collect(),
    }
}

#[test]
fn recipients_are_grouped_by_route_one_job_each() {
    let cfg = config();
    let mut core = Core::new();
    let mut out = Vec::new();
    let env = envelope(&["x@a.example", "y@b.example", "z@A.EXAMPLE"]);
    core.admit(&cfg, env, false, Instant::now(), 0, &mut out);
    assert_eq!(jobs(&out), vec![(0, vec![0, 2]), (1, vec![1])]);
}

#[test]
fn unroutable_recipients_bounce_at_once() {
    let cfg = config();
    let mut core = Core::new();
    let mut out = Vec::new();
    let env = envelope(&["x@a.example", "y@nowhere.example"]);
    core.admit(&cfg, env, false, Instant::now(), 1_000_000, &mut out);
    assert_eq!(jobs(&out), vec![(0, vec![0])]);
    match &out[1] {
        Action::Settle {
            bounce, finished, ..
        } => {
            assert_eq!(bounce.len(), 1);
            assert_eq!(bounce[0].address, "y@nowhere.example");
            assert!(bounce[0].reply.starts_with("550 5.4.4"));
            assert!(!finished);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn delivery_finishes_the_message() {
    let cfg = config();
    let mut core = Core::new();
    let mut out = Vec::new();
    let now = Instant::now();
    core.admit(&cfg, envelope(&["x@a.example"]), false, now, 0, &mut out);
    out.clear();
    core.result(
        &cfg,
        result(&[(0, Outcome::Delivered)]),
        now,
        1_000_000,
        &mut out,
    );
    assert!(
        matches!(&out[..], [Action::Settle { finished: true, bounce, .. }] if bounce.is_empty())
    );
    assert!(core.is_empty());
}

#[test]
fn deferred_recipients_follow_the_retry_schedule() {
    let cfg = config();
    let mut core = Core::new();
    let mut out = Vec::new();
    let t0 = Instant::now();
    core.admit(
        &cfg,
        envelope(&["x@a.example", "y@a.example"]),
        false,
        t0,
        0,
        &mut out,
    );
    out.clear();
    let r = result(&[(0, Outcome::Deferred), (1, Outcome::Delivered)]);
    core.result(&cfg, r, t0, 1_000_000, &mut out);
    match &out[..] {
        [Action::Settle {
            changes, finished, ..
        }] => {
            assert!(!finished);
            assert_eq!(
                changes,
                &vec![
                    (0, RcptState::Pending { attempts: 1 }),
                    (1, RcptState::Done)
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    // First retry after retry[0] = 60 s, not before.
    assert_eq!(core.next_due(), Some(t0 + Duration::from_secs(60)));
    out.clear();
    core.due(&cfg, t0 + Duration::from_secs(59), 0, &mut out);
    assert!(out.is_empty());
    core.due(&cfg, t0 + Duration::from_secs(60), 0, &mut out);
    assert_eq!(jobs(&out), vec![(0, vec![0])]);
    // Second deferral waits retry[1]; later ones repeat the last step.
    out.clear();
    let t1 = t0 + Duration::from_secs(60);
    core.result(
        &cfg,
        result(&[(0, Outcome::Deferred)]),
        t1,
        1_060_000,
        &mut out,
    );
    assert_eq!(core.next_due(), Some(t1 + Duration::from_secs(300)));
    assert_eq!(
        retry_delay(&cfg.delivery.retry, 7),
        Duration::from_secs(300)
    );
}

#[test]
fn a_permanent_failure_bounces() {
    let cfg = config();
    let mut core = Core::new();
    let mut out = Vec::new();
    let now = Instant::now();
    core.admit(&cfg, envelope(&["x@a.example"]), false, now, 0, &mut out);
    out.clear();
    core.result(
        &cfg,
        result(&[(0, Outcome::Failed)]),
        now,
        1_000_000,
        &mut out,
    );
    match &out[..] {
        [Action::Settle {
            bounce, finished, ..
        }] => {
            assert!(finished);
            assert_eq!(bounce[0].reply, "550 5.1.1 no such user");
            assert!(!bounce[0].expired);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_deferral_past_the_queue_lifetime_expires() {
    let cfg = config();
    let mut core = Core::new();
    let mut out = Vec::new();
    let now = Instant::now();
    core.admit(&cfg, envelope(&["x@a.example"]), false, now, 0, &mut out);
    out.clear();
    // Arrived at 1_000_000 ms, lifetime 1 h; the next retry (60 s) would
    // fall after 1_000_000 + 3_600_000.
    let late = 1_000_000 + 3_600_000 - 59_000;
    core.result(&cfg, result(&[(0, Outcome::Deferred)]), now, late, &mut out);
    match &out[..] {
        [Action::Settle {
            bounce, finished, ..
        }] => {
            assert!(finished);
            assert!(bounce[0].expired);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(core.next_due(), None);
}

#[test]
fn recovered_messages_dispatch_only_pending_recipients() {
    let cfg = config();
    let mut core = Core::new();
    let mut out = Vec::new();
    let mut env = envelope(&["x@a.example", "y@a.example"]);
    env.recipients[0].state = RcptState::Done;
    core.admit(&cfg, env, false, Instant::now(), 0, &mut out);
    assert_eq!(jobs(&out), vec![(0, vec![1])]);
}

#[test]
fn results_for_unknown_messages_are_ignored() {
    let cfg = config();
    let mut core = Core::new();
    let mut out = Vec::new();
    core.result(
        &cfg,
        result(&[(0, Outcome::Delivered)]),
        Instant::now(),
        0,
        &mut out,
    );
    assert!(out.is_empty());
}
