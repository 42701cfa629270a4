//! The leader's side of a join: read who is a member from raft's
//! membership, decide with `decide::admit`, and carry the steps out
//! through openraft, one change at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::{ChangeMembers, Raft};

use super::decide::{self, Admission, Known, Step};
use crate::cluster::rpc::{JoinReply, JoinRequest};
use crate::cluster::state::{Command, Member, NodeId, NodeState, TypeConfig};

/// Members as the leader's raft membership has them: every node with its
/// record, and whether it votes.
pub fn known(raft: &Raft<TypeConfig>) -> BTreeMap<NodeId, Known> {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, member)| {
            let known = Known {
                member: member.clone(),
                voter: voters.contains(id),
            };
            (*id, known)
        })
        .collect()
}

/// Admit `req` on this node, which must be the leader. A learner that has
/// not caught up within `join_timeout` is removed again, so a joiner that
/// vanished mid-join leaves nothing behind and its next attempt starts
/// clean. `back`: the joiner is a member that left and now returns; it is
/// published up again.
pub async fn admit(
    raft: &Raft<TypeConfig>,
    req: &JoinRequest,
    max_voters: usize,
    join_timeout: Duration,
    back: bool,
) -> JoinReply {
    let (steps, voter) = match decide::admit(&known(raft), req, max_voters) {
        Admission::Steps { steps, voter } => (steps, voter),
        Admission::Refuse(reason) => {
            tracing::warn!(node = %req.name, incarnation = req.incarnation, %reason, "join refused");
            return JoinReply::Refused { reason };
        }
    };
    for step in steps {
        if let Err(reason) = run(raft, step, join_timeout).await {
            tracing::warn!(node = %req.name, %reason, "join step failed; the joiner will retry");
            return JoinReply::Retry { reason };
        }
    }
    if back {
        let up = Command::SetState {
            id: req.incarnation,
            state: NodeState::Up,
            at_ms: crate::clock::now_ms(),
            from: Some(NodeState::Left),
        };
        if let Err(reason) = write(raft, up).await {
            return JoinReply::Retry { reason };
        }
    }
    tracing::info!(node = %req.name, incarnation = req.incarnation, voter, back, "node admitted");
    JoinReply::Admitted { voter }
}

async fn run(raft: &Raft<TypeConfig>, step: Step, join_timeout: Duration) -> Result<(), String> {
    match step {
        Step::RemoveNode(id) => remove(raft, id).await,
        Step::Forget(id) => write(raft, Command::Remove { id }).await,
        Step::Record(id, member) => write(raft, Command::Upsert { id, member }).await,
        Step::AddLearner(id, member) => {
            let added = raft
                .add_learner(id, member, false)
                .await
                .map_err(|e| format!("adding learner {id}: {e}"))?;
            // openraft's own blocking wait counts a learner thousands of
            // entries behind as caught up; we want the entry that added it.
            let want = added.log_id.index;
            let caught_up = raft
                .wait(Some(join_timeout))
                .metrics(|m| matched(m, id) >= Some(want), "learner caught up")
                .await;
            if caught_up.is_err() {
                // Half-finished join: roll it back so the next attempt
                // does not find a stale learner.
                let _ = remove(raft, id).await;
                return Err(format!(
                    "learner {id} did not catch up within {join_timeout:?}"
                ));
            }
            Ok(())
        }
    }
}

/// Remove member `id` for good (an operator's evict): out of the voters,
/// out of the cluster, and its record forgotten. The same steps a
/// replaced incarnation goes through.
pub async fn evict(raft: &Raft<TypeConfig>, id: NodeId) -> Result<(), String> {
    remove(raft, id).await?;
    write(raft, Command::Remove { id }).await
}

/// Take `id` out of the voters (if it is one) and out of the cluster.
async fn remove(raft: &Raft<TypeConfig>, id: NodeId) -> Result<(), String> {
    let ids = BTreeSet::from([id]);
    if known(raft).get(&id).is_some_and(|k| k.voter) {
        raft.change_membership(ChangeMembers::RemoveVoters(ids.clone()), false)
            .await
            .map_err(|e| format!("removing voter {id}: {e}"))?;
    }
    if known(raft).contains_key(&id) {
        raft.change_membership(ChangeMembers::RemoveNodes(ids), false)
            .await
            .map_err(|e| format!("removing node {id}: {e}"))?;
    }
    Ok(())
}

async fn write(raft: &Raft<TypeConfig>, command: Command) -> Result<(), String> {
    raft.client_write(command)
        .await
        .map(|_| ())
        .map_err(|e| format!("writing to the cluster log: {e}"))
}

/// The last log index the leader knows `id` holds, if it leads.
fn matched(m: &openraft::RaftMetrics<NodeId, Member>, id: NodeId) -> Option<u64> {
    let r = m.replication.as_ref()?.get(&id)?.as_ref()?;
    Some(r.index)
}
