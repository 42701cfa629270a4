//! The cluster calls of resource groups, answered on every node: grants
//! to owners (as a voter), outstanding grants (to the leader taking a
//! group back), and owners' reports (as the leader, into the log).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::Raft;
use tokio::sync::watch;
use tokio::time::Instant;

use super::lease::{Grants, MAX_LEASE};
use crate::cluster::identity::Identity;
use crate::cluster::raft::store::ClusterView;
use crate::cluster::rpc::group::{GroupReply, GroupRequest, Refusal};
use crate::cluster::state::groups::GroupCommand;
use crate::cluster::state::{Command, NodeId, Response, TypeConfig};

/// Answers group calls on this node.
pub struct GroupService {
    me: Identity,
    raft: Raft<TypeConfig>,
    view: watch::Receiver<ClusterView>,
    grants: Mutex<Grants>,
    longest: Mutex<Longest>,
}

/// The longest grant this voter ever promised, in a file: a restarted
/// voter vouches for that long, whatever its configuration says now.
struct Longest {
    path: PathBuf,
    ttl: Duration,
}

impl Longest {
    /// What the file says; an unreadable one counts as the most a voter
    /// ever promises.
    fn load(path: PathBuf) -> Longest {
        let ttl = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map(Duration::from_millis).unwrap_or_else(|_| {
                tracing::warn!(path = %path.display(), "unreadable lease record: assuming the longest lease");
                MAX_LEASE
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Duration::ZERO,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the lease record: assuming the longest lease");
                MAX_LEASE
            }
        };
        Longest { path, ttl }
    }

    /// Make sure a promise of `ttl` is covered after a restart: record it
    /// (durably) before it is made, if it is the longest yet. Rare: once
    /// per new, longer lease.
    fn cover(&mut self, ttl: Duration) -> std::io::Result<()> {
        if ttl <= self.ttl {
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, ttl.as_millis().to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        self.ttl = ttl;
        Ok(())
    }
}

impl GroupService {
    /// A service for node `me`, recording its longest promise in `record`.
    pub fn new(
        me: Identity,
        raft: Raft<TypeConfig>,
        view: watch::Receiver<ClusterView>,
        record: PathBuf,
    ) -> Arc<GroupService> {
        let longest = Longest::load(record);
        Arc::new(GroupService {
            me,
            raft,
            view,
            grants: Mutex::new(Grants::new(Instant::now(), longest.ttl)),
            longest: Mutex::new(longest),
        })
    }

    /// Answer `req` from the authenticated node `from` (this node itself
    /// for local calls).
    pub async fn handle(&self, from: &Identity, req: GroupRequest) -> GroupReply {
        match req {
            GroupRequest::Grant {
                group,
                epoch,
                ttl_ms,
            } => self.grant(from, &group, epoch, ttl_ms),
            GroupRequest::Outstanding { group, epoch } => self.outstanding(&group, epoch),
            GroupRequest::Record(cmd) => self.record(from, cmd).await,
            GroupRequest::SetDrain { node, draining } => {
                self.write(Command::Drain { id: node, draining }).await
            }
        }
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config.membership().voter_ids().collect()
    }

    fn grant(&self, from: &Identity, group: &str, epoch: u64, ttl_ms: u64) -> GroupReply {
        if !self.voters().contains(&self.me.incarnation) {
            return GroupReply::Refused(Refusal::NotAVoter);
        }
        let view = self.view.borrow();
        let g = view.state.groups.get(group);
        let ttl = Duration::from_millis(ttl_ms).min(MAX_LEASE);
        let covered = self
            .longest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cover(ttl);
        if let Err(e) = covered {
            return GroupReply::Refused(Refusal::LeaseNotRecorded(e.to_string()));
        }
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        match grants.grant(group, from.incarnation, epoch, g, ttl, Instant::now()) {
            Ok(t) => GroupReply::Granted {
                ttl_ms: t.as_millis() as u64,
            },
            Err(why) => GroupReply::Refused(why.into()),
        }
    }

    fn outstanding(&self, group: &str, epoch: u64) -> GroupReply {
        let view = self.view.borrow();
        let over =
            view.state.groups.get(group).is_some_and(|g| {
                g.epoch > epoch || (g.epoch == epoch && (g.revoked || g.released))
            });
        let remaining_ms = over.then(|| {
            let grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
            // Rounded up: the leader must not wait a moment too little.
            let left = grants.outstanding(group, Instant::now());
            left.as_micros().div_ceil(1000) as u64
        });
        GroupReply::Outstanding { remaining_ms }
    }

    async fn record(&self, from: &Identity, cmd: GroupCommand) -> GroupReply {
        // Reports and fences speak for the node that sends them; a move is
        // an operator's request through any node's admin API; any member
        // may declare what its configuration defines.
        let allowed = match &cmd {
            GroupCommand::Report { node, .. }
            | GroupCommand::Fence { node, .. }
            | GroupCommand::Counting { node, .. } => *node == from.incarnation,
            GroupCommand::Move { .. } | GroupCommand::Declare { .. } => true,
            GroupCommand::Assign { .. }
            | GroupCommand::Revoke { .. }
            | GroupCommand::Drain { .. } => false,
        };
        if !allowed {
            return GroupReply::Refused(Refusal::NotItsOwn);
        }
        self.write(Command::Group(cmd)).await
    }

    /// Write `cmd` to the log, as the leader.
    async fn write(&self, cmd: Command) -> GroupReply {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(m.id) {
            return GroupReply::Refused(Refusal::NotLeader);
        }
        match self.raft.client_write(cmd).await {
            Ok(r) if r.data == Response::Done => GroupReply::Recorded,
            // Another epoch by now: the report no longer matters.
            Ok(r) => GroupReply::Refused(Refusal::NotApplied(r.data)),
            Err(e) => GroupReply::Refused(Refusal::LogWrite(e.to_string())),
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
