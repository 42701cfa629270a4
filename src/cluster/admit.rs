//! The leader's side of a join: read who is a member from raft's
//! membership, decide with `membership::admit`, and carry the steps out
//! through openraft, one change at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::{ChangeMembers, Raft};

use super::membership::{self, Admission, Known, Step};
use super::rpc::{JoinReply, JoinRequest};
use super::types::{Command, NodeId, TypeConfig};

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
/// clean.
pub async fn admit(
    raft: &Raft<TypeConfig>,
    req: &JoinRequest,
    max_voters: usize,
    join_timeout: Duration,
) -> JoinReply {
    let (steps, voter) = match membership::admit(&known(raft), req, max_voters) {
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
    tracing::info!(node = %req.name, incarnation = req.incarnation, voter, "node admitted");
    JoinReply::Admitted { voter }
}

async fn run(raft: &Raft<TypeConfig>, step: Step, join_timeout: Duration) -> Result<(), String> {
    match step {
        Step::RemoveNode(id) => remove(raft, id).await,
        Step::Forget(id) => write(raft, Command::Remove { id }).await,
        Step::Record(id, member) => write(raft, Command::Upsert { id, member }).await,
        Step::AddLearner(id, member) => {
            match tokio::time::timeout(join_timeout, raft.add_learner(id, member, true)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("adding learner {id}: {e}")),
                Err(_) => {
                    // Half-finished join: roll it back so the next
                    // attempt does not find a stale learner.
                    let _ = remove(raft, id).await;
                    Err(format!(
                        "learner {id} did not catch up within {join_timeout:?}"
                    ))
                }
            }
        }
        Step::Promote(id) => raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
            .await
            .map(|_| ())
            .map_err(|e| format!("promoting {id}: {e}")),
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
