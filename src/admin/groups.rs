//! `GET /v1/groups` and `POST /v1/groups/{name}/move/{node}`. The list is
//! read from the replicated state; a move is one log entry written by the
//! leader (asked over the cluster link from any node) under a deadline —
//! the move itself then runs in the background: the owner drains, stops
//! and releases, and the leader places the group on the target.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{problem, AdminState, Answer, ClusterReadout, ACTION_DEADLINE};
use crate::clock::now_ms;
use crate::cluster::state::groups::delivery_node;
use crate::cluster::state::ClusterState;

/// One row of `GET /v1/groups`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupRow {
    /// Name.
    pub name: String,
    /// The owner's name; None: not placed.
    pub owner: Option<String>,
    /// Fencing epoch.
    pub epoch: u64,
    /// What the owner last reported: offline, starting, online, stopping
    /// or failed.
    pub status: String,
    /// Where the epoch is: "unplaced", "assigned", "draining" (the owner
    /// hands it over), "revoked" (being taken back) or "released".
    pub phase: String,
    /// Where an operator asked it to go, if pending.
    pub move_to: Option<String>,
    /// Nodes it may not be placed on (a stop failed there).
    pub fenced: Vec<String>,
    /// When the last transition happened (ms since the epoch; 0 never).
    pub since_ms: u64,
    /// The voter sets the owner may count its lease in: to take the group
    /// from it, a majority of each must say its grants ran out. More than
    /// one just after a membership change, until the owner counts in the
    /// newest (a set whose majority is gone holds the group where it is).
    #[serde(default)]
    pub lease_counted_in: Vec<Vec<String>>,
    /// Why.
    pub reason: String,
}

fn name(state: &ClusterState, id: u64) -> String {
    state
        .members
        .get(&id)
        .map_or_else(|| format!("{id:x}"), |m| m.member.name.clone())
}

/// Every configured group, and any other the state knows.
pub(super) async fn list(State(s): State<Arc<AdminState>>) -> Answer<Vec<GroupRow>> {
    let Some(ClusterReadout { handle, groups, .. }) = &s.cluster else {
        return problem(StatusCode::NOT_FOUND, "this node runs alone: no groups");
    };
    let state = handle.view.borrow().state.clone();
    let mut names: Vec<String> = groups.clone();
    // Members' delivery groups are not the operator's: `ctl nodes` tells
    // whether each member may deliver.
    let other = |k: &&String| !groups.contains(k) && delivery_node(k).is_none();
    names.extend(state.groups.keys().filter(other).cloned());
    let rows = names
        .into_iter()
        .map(|n| {
            let g = state.groups.get(&n).cloned().unwrap_or_default();
            let counted_in = handle.lease_configs(&n);
            let phase = match (g.owner, g.revoked, g.released) {
                (None, ..) => "unplaced",
                (_, _, true) => "released",
                (_, true, _) => "revoked",
                _ if g.draining => "draining",
                _ => "assigned",
            };
            GroupRow {
                name: n,
                owner: g.owner.map(|o| name(&state, o)),
                epoch: g.epoch,
                status: g.status.to_string(),
                phase: phase.into(),
                move_to: g.move_to.map(|t| name(&state, t)),
                fenced: g.fenced.iter().map(|f| name(&state, *f)).collect(),
                since_ms: g.since_ms,
                lease_counted_in: counted_in
                    .iter()
                    .map(|c| {
                        let mut names: Vec<String> = c.iter().map(|id| name(&state, *id)).collect();
                        names.sort();
                        names
                    })
                    .collect(),
                reason: g.reason,
            }
        })
        .collect();
    Ok(Json(rows))
}

/// Ask the leader to move `group` to `node`.
pub(super) async fn move_to(
    State(s): State<Arc<AdminState>>,
    Path((group, node)): Path<(String, String)>,
) -> Answer<serde_json::Value> {
    let Some(ClusterReadout { handle, groups, .. }) = &s.cluster else {
        return problem(StatusCode::NOT_FOUND, "this node runs alone: no groups");
    };
    // Defined here, or declared by another member (a witness defines none).
    let known = groups.contains(&group) || handle.view.borrow().state.groups.contains_key(&group);
    if !known {
        return problem(StatusCode::NOT_FOUND, format!("no group named {group}"));
    }
    match handle
        .move_group(&group, &node, now_ms(), ACTION_DEADLINE)
        .await
    {
        Ok(()) => Ok(Json(serde_json::json!({
            "group": group,
            "moving_to": node,
        }))),
        Err(e) => super::refused(e),
    }
}
