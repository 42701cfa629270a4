//! The resource monitor never hangs the node: while a resource operation
//! hangs, `ctl status`, `ctl groups` and `ctl nodes` still answer; an
//! operation that hangs past its deadline, or panics, is a failure, and
//! the group fails over to a node whose resources work.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::free_port;
use mtad::admin::client::{self, Command};
use mtad::admin::{AdminState, ClusterReadout};
use mtad::cluster::groups::manager::{self, GroupPolicy};
use mtad::cluster::node::ClusterNode;
use mtad::cluster::rpc::group::{GroupReply, GroupRequest};
use mtad::cluster::state::groups::GroupCommand;
use mtad::config::{ClusterConfig, ClusterRole, GroupConfig, VipProvider};
use mtad::resource::runner::GroupRunner;
use mtad::resource::{OpFuture, Resource};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const NAMES: [&str; 3] = ["a", "b", "c"];

/// How a test resource behaves on its checks.
#[derive(Clone, Copy, PartialEq)]
enum Check {
    Healthy,
    /// Hang until the test opens the gate.
    HangOnGate,
    /// Hang for ever (the monitor's deadline must end it).
    HangForever,
    Panic,
    /// The check fails, and so does every stop that follows until the
    /// test mends it.
    BrokenStop,
    /// Not a resource at all: node a is a witness whose configuration does
    /// not define the group (no policy for its manager, no runner).
    Witness,
}

struct TestResource {
    check: Check,
    gate: Arc<Notify>,
    hanging: Arc<Notify>,
    started: Arc<AtomicBool>,
    /// A broken stop works from now on.
    mended: Arc<AtomicBool>,
}

impl Resource for TestResource {
    fn name(&self) -> String {
        "test resource".into()
    }

    fn start(&self) -> OpFuture {
        self.started.store(true, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn stop(&self) -> OpFuture {
        if self.check == Check::BrokenStop && !self.mended.load(Ordering::SeqCst) {
            return Box::pin(async { Err("the address would not go".to_string()) });
        }
        self.started.store(false, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn check(&self) -> OpFuture {
        let (gate, hanging) = (self.gate.clone(), self.hanging.clone());
        match self.check {
            Check::Healthy | Check::Witness => Box::pin(async { Ok(()) }),
            Check::HangOnGate => Box::pin(async move {
                hanging.notify_one();
                gate.notified().await;
                Ok(())
            }),
            Check::HangForever => Box::pin(async move {
                hanging.notify_one();
                std::future::pending().await
            }),
            Check::Panic => Box::pin(async { panic!("a bug in the resource") }),
            Check::BrokenStop => Box::pin(async { Err("broken".to_string()) }),
        }
    }
}

fn group(check_timeout: Duration) -> GroupConfig {
    GroupConfig {
        name: "mta".into(),
        vip: Some("127.0.0.100/32".parse().unwrap()),
        provider: VipProvider::Loopback,
        interface: None,
        preferred_nodes: NAMES.iter().map(|s| s.to_string()).collect(),
        smtp_port: 25,
        failback: false,
        lease: Duration::from_millis(600),
        start_timeout: Duration::from_secs(5),
        stop_timeout: Duration::from_secs(5),
        check_interval: Duration::from_millis(200),
        check_timeout,
        max_restarts: 0,
        restart_window: Duration::from_secs(60),
        announce_interval: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(1),
    }
}

struct Cluster {
    nodes: Vec<ClusterNode>,
    started: Vec<Arc<AtomicBool>>,
    gate: Arc<Notify>,
    hanging: Arc<Notify>,
    mended: Arc<AtomicBool>,
    admin: String,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The group runners, stopped first (as a node does at shutdown).
    runners: (CancellationToken, TaskTracker),
    _dir: tempfile::TempDir,
}

/// Three nodes; node a's resource checks behave as `a_check`, the others
/// are healthy. Node a serves the admin API.
async fn cluster(a_check: Check, check_timeout: Duration) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("key");
    std::fs::write(&secret, "monitor test secret, long enough").unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
    let runners = (CancellationToken::new(), TaskTracker::new());
    let (gate, hanging) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let mended = Arc::new(AtomicBool::new(false));
    let g = group(check_timeout);
    let mut nodes = Vec::new();
    let mut started = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let cfg = ClusterConfig {
            name: "monitor".into(),
            listen: addrs[i],
            seeds: addrs.clone(),
            secret_file: secret.clone(),
            accept_secret_files: vec![],
            role: if i == 0 && a_check == Check::Witness {
                ClusterRole::Witness
            } else {
                ClusterRole::Member
            },
            max_voters: 5,
            heartbeat_interval: Duration::from_millis(50),
            election_timeout: Duration::from_millis(300),
            join_backoff_min: Duration::from_millis(20),
            join_backoff_max: Duration::from_millis(300),
            join_timeout: Duration::from_secs(10),
        };
        let data = dir.path().join(name);
        let node = ClusterNode::start(&cfg, name, &data, cancel.clone(), &tracker)
            .await
            .unwrap();
        let policy = GroupPolicy {
            name: g.name.clone(),
            preferred: g.preferred_nodes.clone(),
            failback: false,
            lease: g.lease,
            handover: g.drain_timeout + g.stop_timeout,
        };
        let defines = !(i == 0 && a_check == Check::Witness);
        tracker.spawn(manager::run(
            node.handle.clone(),
            if defines { vec![policy] } else { Vec::new() },
            cfg.heartbeat_interval,
            cancel.clone(),
        ));
        let flag = Arc::new(AtomicBool::new(false));
        if !defines {
            started.push(flag);
            nodes.push(node);
            continue;
        }
        let resource = TestResource {
            check: if i == 0 { a_check } else { Check::Healthy },
            gate: gate.clone(),
            hanging: hanging.clone(),
            started: flag.clone(),
            mended: mended.clone(),
        };
        let runner = GroupRunner::new(g.clone(), vec![Arc::new(resource)], node.handle.clone());
        runners.1.spawn(runner.run(runners.0.clone()));
        started.push(flag);
        nodes.push(node);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    let state = AdminState {
        node: "a".into(),
        started: mtad::clock::instant(),
        stats: watch::channel(Default::default()).1,
        cluster: Some(ClusterReadout {
            handle: nodes[0].handle.clone(),
            problem: nodes[0].problem.clone(),
            groups: vec!["mta".into()],
            quorum_within: std::time::Duration::from_secs(1),
            secrets: nodes[0].secret_fingerprints(),
            holder: None,
        }),
        mail: None,
        reload: None,
        token: None,
        drain: Default::default(),
    };
    tracker.spawn(mtad::admin::serve(listener, state, cancel.clone()));
    Cluster {
        nodes,
        started,
        gate,
        hanging,
        mended,
        admin,
        cancel,
        tracker,
        runners,
        _dir: dir,
    }
}

impl Cluster {
    /// Waits until the group is online on a node `want` accepts; returns
    /// that node's index.
    async fn online_on(&self, want: impl Fn(usize) -> bool) -> usize {
        let mut view = self.nodes[1].view.clone();
        let index = |id| self.nodes.iter().position(|n| n.identity.incarnation == id);
        let wait = view.wait_for(|v| {
            v.state.groups.get("mta").is_some_and(|g| {
                g.status.to_string() == "online" && g.owner.and_then(index).is_some_and(&want)
            })
        });
        let v = tokio::time::timeout(common::node::PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("mta never online where wanted"))
            .unwrap()
            .clone();
        index(v.state.groups["mta"].owner.unwrap()).unwrap()
    }

    async fn stop(self) {
        self.runners.0.cancel();
        self.runners.1.close();
        self.runners.1.wait().await;
        self.cancel.cancel();
        for n in &self.nodes {
            let _ = n.raft.shutdown().await;
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_answers_while_a_resource_operation_hangs() {
    // The check deadline is far away: the hang lasts until the gate opens.
    let c = cluster(Check::HangOnGate, Duration::from_secs(120)).await;
    assert_eq!(c.online_on(|i| i == 0).await, 0);
    c.hanging.notified().await;
    for cmd in [Command::Status, Command::Groups, Command::Nodes] {
        let out = client::run(&c.admin, &cmd, false).await;
        let out = out.unwrap_or_else(|e| panic!("{cmd:?} failed while a check hangs: {e}"));
        assert!(!out.text.is_empty());
    }
    let groups = client::run(&c.admin, &Command::Groups, true).await.unwrap();
    assert!(groups.text.contains("\"online\""), "{}", groups.text);
    // Still hanging: nothing has finished the check.
    assert!(c.started[0].load(Ordering::SeqCst));
    c.gate.notify_one();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_hangs_past_its_deadline_fails_the_group_over() {
    let c = cluster(Check::HangForever, Duration::from_millis(300)).await;
    // Online on a (the first preferred), whose check then hangs; awaited
    // through the resource, since the group may be online there only
    // briefly.
    c.hanging.notified().await;
    let now = c.online_on(|i| i != 0).await;
    assert!(!c.started[0].load(Ordering::SeqCst), "stopped on a");
    assert!(
        c.started[now].load(Ordering::SeqCst),
        "running where it moved"
    );
    let g = c.nodes[now].view.borrow().state.groups["mta"].clone();
    assert!(g.epoch >= 2, "a new epoch elsewhere: {g:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_panics_fails_the_group_over() {
    let c = cluster(Check::Panic, Duration::from_millis(300)).await;
    let now = c.online_on(|i| i != 0).await;
    assert!(!c.started[0].load(Ordering::SeqCst));
    assert!(c.started[now].load(Ordering::SeqCst));
    // Placed on a first (preferred), then moved: a later epoch.
    let g = c.nodes[now].view.borrow().state.groups["mta"].clone();
    assert!(g.epoch >= 2, "moved, not placed elsewhere first: {g:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_fails_fences_the_node_and_the_group_moves_on() {
    // The stop is tried again until it succeeds; then the fence lifts.
    let c = cluster(Check::BrokenStop, Duration::from_millis(300)).await;
    let now = c.online_on(|i| i != 0).await;
    let g = c.nodes[now].view.borrow().state.groups["mta"].clone();
    let a = c.nodes[0].identity.incarnation;
    assert!(g.fenced.contains(&a), "a is fenced: {g:?}");
    // a's resource never stopped; the group moved on once the grants for
    // a's epoch ran out, and ctl shows the fence for the operator to clear.
    assert!(c.started[0].load(Ordering::SeqCst));
    let groups = client::run(&c.admin, &Command::Groups, true).await.unwrap();
    let rows: serde_json::Value = serde_json::from_str(&groups.text).unwrap();
    assert_eq!(rows[0]["fenced"], serde_json::json!(["a"]), "{rows}");
    c.mended.store(true, Ordering::SeqCst);
    let mut view = c.nodes[now].view.clone();
    let lifted = view.wait_for(|v| v.state.groups["mta"].fenced.is_empty());
    tokio::time::timeout(common::node::PATIENCE, lifted)
        .await
        .expect("the fence is lifted once a stop succeeds")
        .unwrap();
    assert!(!c.started[0].load(Ordering::SeqCst), "stopped on a at last");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_that_leads_without_defining_the_group_still_places_and_moves_it() {
    // a bootstraps, so it leads; only b and c define the group, and their
    // runners declare it to the cluster.
    let c = cluster(Check::Witness, Duration::from_millis(300)).await;
    assert_eq!(
        c.online_on(|i| i != 0).await,
        1,
        "b: first preferred member"
    );
    assert!(c.nodes[0].handle.leads(), "the witness leads");
    let g = c.nodes[0].view.borrow().state.groups["mta"].clone();
    assert_eq!(g.preferred, NAMES.map(String::from).to_vec());
    // The witness's manager carries out a move as well.
    let to = Some(c.nodes[2].identity.incarnation);
    let at_ms = 0; // only shown to operators
    let cmd = GroupCommand::Move {
        group: "mta".into(),
        to,
        at_ms,
    };
    let reply = c.nodes[1]
        .handle
        .to_leader(GroupRequest::Record(cmd), Duration::from_secs(5))
        .await;
    assert_eq!(reply, Ok(GroupReply::Recorded));
    assert_eq!(c.online_on(|i| i == 2).await, 2);
    assert!(!c.started[1].load(Ordering::SeqCst), "stopped on b");
    c.stop().await;
}
