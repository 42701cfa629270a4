//! `GET /metrics`: what the recorder counted, then gauges of the present
//! read from published state — never waiting on a resource operation, and
//! on the queue only up to a deadline (a scrape without queue gauges beats
//! a scrape that hangs).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::AdminState;
use crate::cluster::state::groups::delivery_node;
use crate::cluster::NodeState;
use crate::metrics::{render, Present};

/// Longest a scrape waits for the queue's summary.
const QUEUE_WITHIN: Duration = Duration::from_secs(2);

pub(super) async fn scrape(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut p = Present::default();
    let q = *s.stats.borrow();
    p.gauge(
        "mtad_queue_messages_total",
        "Messages queued on this node.",
        &[],
        q.queued as f64,
    );
    if let Some(m) = &s.mail {
        if let Ok(Some(rows)) = tokio::time::timeout(QUEUE_WITHIN, m.queue.summary()).await {
            let now = crate::clock::now_ms();
            for r in &rows {
                let d = [("destination", r.name.as_str())];
                let age = now.saturating_sub(r.oldest_ms) as f64 / 1000.0;
                p.gauge(
                    "mtad_queue_messages",
                    "Messages queued, by destination.",
                    &d,
                    r.messages as f64,
                );
                p.gauge(
                    "mtad_queue_recipients",
                    "Recipients queued, by destination.",
                    &d,
                    r.recipients as f64,
                );
                p.gauge(
                    "mtad_queue_oldest_seconds",
                    "Age of the oldest queued message, by destination.",
                    &d,
                    age,
                );
            }
        }
        for d in m.destinations.snapshot() {
            let l = [("destination", d.name.as_str())];
            p.gauge(
                "mtad_associations_open",
                "Associations open or opening, by destination.",
                &l,
                d.associations as f64,
            );
            p.gauge(
                "mtad_associations_established",
                "Associations with an SMTP session, by destination.",
                &l,
                d.established as f64,
            );
            p.gauge(
                "mtad_destination_backlog",
                "Jobs waiting for an association, by destination.",
                &l,
                d.backlog as f64,
            );
        }
    }
    if let Some(c) = &s.cluster {
        let m = c.handle.raft.metrics().borrow().clone();
        let state = c.handle.view.borrow().state.clone();
        p.gauge(
            "mtad_cluster_term",
            "The raft term this node is in.",
            &[],
            m.current_term as f64,
        );
        let leads = m.current_leader == Some(m.id);
        p.gauge(
            "mtad_cluster_is_leader",
            "1 while this node leads.",
            &[],
            f64::from(u8::from(leads)),
        );
        let leader = m.current_leader.and_then(|l| state.members.get(&l));
        p.gauge(
            "mtad_cluster_has_leader",
            "1 while a leader is known.",
            &[],
            f64::from(u8::from(leader.is_some())),
        );
        for ms in state.members.values() {
            for st in [NodeState::Up, NodeState::Suspect, NodeState::Down] {
                let on = f64::from(u8::from(ms.state == st));
                let name = st.to_string();
                let l = [("node", ms.member.name.as_str()), ("state", name.as_str())];
                p.gauge(
                    "mtad_cluster_member_state",
                    "1 for each member's state as the cluster records it.",
                    &l,
                    on,
                );
            }
            let is = f64::from(u8::from(
                leader.is_some_and(|l| l.member.name == ms.member.name),
            ));
            p.gauge(
                "mtad_cluster_leader",
                "1 for the member that leads.",
                &[("node", ms.member.name.as_str())],
                is,
            );
        }
        let groups = state.groups.iter();
        for (name, g) in groups.filter(|(n, _)| delivery_node(n).is_none()) {
            let owner = g
                .owner
                .and_then(|o| state.members.get(&o))
                .map(|m| m.member.name.as_str());
            let live = !g.revoked && !g.released;
            if let Some(owner) = owner.filter(|_| live) {
                let l = [("group", name.as_str()), ("node", owner)];
                p.gauge(
                    "mtad_group_owner",
                    "1 for the node that owns each group.",
                    &l,
                    1.0,
                );
            }
            let l = [("group", name.as_str())];
            let online = live && g.status == crate::cluster::state::groups::GroupStatus::Online;
            p.gauge(
                "mtad_group_online",
                "1 while the group serves on its owner.",
                &l,
                f64::from(u8::from(online)),
            );
            p.gauge(
                "mtad_group_epoch",
                "The group's fencing epoch.",
                &l,
                g.epoch as f64,
            );
            p.counter(
                "mtad_group_failovers_total",
                "Times the group was taken back from a failed owner.",
                &l,
                g.failovers as f64,
            );
        }
    }
    let body = render() + &p.finish();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
