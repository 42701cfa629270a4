//! A real single-node openraft instance on our storage, restarted: the vote,
//! log, purge point, committed id and snapshot must carry it through.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Config, Raft, ServerState};

use super::{open, ClusterView};
use crate::cluster::state::{Command, Member, NodeId, NodeState, Response, Role, TypeConfig};

/// A single node never sends an RPC; any attempt is a test failure.
struct NoNetwork;

fn unreachable<E: std::error::Error>() -> RPCError<NodeId, Member, E> {
    RPCError::Unreachable(Unreachable::new(&io::Error::other("single-node test")))
}

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoNetwork;

    async fn new_client(&mut self, _target: NodeId, _node: &Member) -> NoNetwork {
        NoNetwork
    }
}

impl RaftNetwork<TypeConfig> for NoNetwork {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        Err(unreachable())
    }
}

/// The single node's id.
pub(crate) const ME: NodeId = 0x5eed;
const WAIT: Option<Duration> = Some(Duration::from_secs(10));

fn member(name: &str) -> Member {
    Member {
        name: name.into(),
        addr: "127.0.0.1:7400".into(),
        role: Role::Member,
    }
}

async fn start(dir: &Path) -> (Raft<TypeConfig>, tokio::sync::watch::Receiver<ClusterView>) {
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        // Purge everything the snapshot covers, so restart must use it.
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    let config = Arc::new(config.validate().unwrap());
    let (log, sm) = open(dir).unwrap();
    let view = sm.subscribe();
    let raft = Raft::new(ME, config, NoNetwork, log, sm).await.unwrap();
    (raft, view)
}

/// A fresh single-node raft in `dir`, initialized and leading, with
/// `ME` as its only voter (for tests of what runs on top of raft).
pub(crate) async fn single_leader(
    dir: &Path,
) -> (Raft<TypeConfig>, tokio::sync::watch::Receiver<ClusterView>) {
    let (raft, view) = start(dir).await;
    raft.initialize(BTreeMap::from([(ME, member("me"))]))
        .await
        .unwrap();
    raft.wait(WAIT)
        .state(ServerState::Leader, "leader")
        .await
        .unwrap();
    (raft, view)
}

async fn write(raft: &Raft<TypeConfig>, cmd: Command) -> Response {
    raft.client_write(cmd).await.unwrap().data
}

#[tokio::test]
async fn single_node_raft_recovers_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (before, last) = {
        let (raft, view) = start(dir.path()).await;
        raft.initialize(BTreeMap::from([(ME, member("me"))]))
            .await
            .unwrap();
        raft.wait(WAIT)
            .state(ServerState::Leader, "leader")
            .await
            .unwrap();
        for (id, name) in [(1, "a"), (2, "b"), (3, "a")] {
            write(
                &raft,
                Command::Upsert {
                    id,
                    member: member(name),
                },
            )
            .await;
        }
        raft.trigger().snapshot().await.unwrap();
        raft.wait(WAIT)
            .metrics(
                |m| m.snapshot.is_some() && m.purged.is_some(),
                "snapshot + purge",
            )
            .await
            .unwrap();
        // Entries after the snapshot: restart must replay them from the log.
        let set = Command::SetState {
            id: 2,
            state: NodeState::Suspect,
            at_ms: 77,
            from: None,
        };
        assert_eq!(write(&raft, set).await, Response::Done);
        let last = raft.metrics().borrow().last_applied.unwrap();
        raft.shutdown().await.unwrap();
        let before = view.borrow().clone();
        (before, last)
    };
    assert_eq!(before.state.members.len(), 2);
    assert_eq!(before.state.members[&2].state, NodeState::Suspect);

    let (raft, view) = start(dir.path()).await;
    // The persisted committed id lets the node replay up to it on its own.
    raft.wait(WAIT)
        .applied_index_at_least(Some(last.index), "replayed")
        .await
        .unwrap();
    assert_eq!(view.borrow().state, before.state);
    assert!(raft.metrics().borrow().snapshot.is_some());
    raft.wait(WAIT)
        .state(ServerState::Leader, "re-elected")
        .await
        .unwrap();
    let r = write(&raft, Command::Remove { id: 1 }).await;
    assert_eq!(r, Response::UnknownMember, "1 was replaced by 3");
    raft.shutdown().await.unwrap();
}
