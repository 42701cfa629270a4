//! `/v1/queue…`: what is queued and what an operator does to it. The
//! queue driver answers between two events from memory; headers come from
//! the spool. Each call has a deadline like every other admin call.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{problem, AdminState, Answer, ACTION_DEADLINE};
use crate::delivery::Destinations;
use crate::queue::ops::{self, DestinationRow, Filter, MessageDetail, Op, Page, Selector};
use crate::queue::QueueHandle;
use crate::shadow::ReplicatedSpool;
use crate::spool::Spool;

/// Longest header section `queue show` returns.
const MAX_HEADERS: usize = 64 * 1024;

/// What the queue calls read.
#[derive(Clone)]
pub struct MailReadout {
    /// The queue driver.
    pub queue: QueueHandle,
    /// Where message content lives.
    pub spool: Arc<dyn Spool>,
    /// The delivery side, for associations per destination.
    pub destinations: Destinations,
    /// This node's copies on other members, when it makes any.
    pub replicated: Option<Arc<ReplicatedSpool>>,
}

/// Query of `GET /v1/queue`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ListQuery {
    dest: Option<String>,
    state: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// The answer to an action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Acted {
    /// What was done.
    pub op: Op,
    /// How many messages it changed.
    pub changed: usize,
}

fn mail(s: &AdminState) -> Result<&MailReadout, (StatusCode, Json<super::Problem>)> {
    s.mail.as_ref().ok_or_else(|| {
        let error = "this node queues no mail".to_string();
        (StatusCode::NOT_FOUND, Json(super::Problem { error }))
    })
}

/// Wait for the queue driver, within the deadline.
async fn within<T>(work: impl std::future::Future<Output = Option<T>>) -> Answer<T> {
    match tokio::time::timeout(ACTION_DEADLINE, work).await {
        Ok(Some(v)) => Ok(Json(v)),
        Ok(None) => problem(StatusCode::SERVICE_UNAVAILABLE, "the queue has stopped"),
        Err(_) => problem(
            StatusCode::GATEWAY_TIMEOUT,
            "the queue did not answer in time",
        ),
    }
}

fn check_state(state: &Option<String>) -> Result<(), String> {
    match state {
        Some(s) if !ops::STATES.contains(&s.as_str()) => Err(format!(
            "unknown state {s:?}: one of {}",
            ops::STATES.join(", ")
        )),
        _ => Ok(()),
    }
}

pub(super) async fn list(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<ListQuery>,
) -> Answer<Page> {
    let m = mail(&s)?;
    if let Err(why) = check_state(&q.state) {
        return problem(StatusCode::BAD_REQUEST, why);
    }
    let after = match q.after.as_deref().map(ops::parse_id) {
        Some(None) => return problem(StatusCode::BAD_REQUEST, "after: not a queue id"),
        Some(id) => id,
        None => None,
    };
    let f = Filter {
        dest: q.dest,
        state: q.state,
    };
    within(m.queue.list(f, after, q.limit.unwrap_or(100))).await
}

pub(super) async fn summary(State(s): State<Arc<AdminState>>) -> Answer<Vec<DestinationRow>> {
    let m = mail(&s)?;
    let Json(mut rows) = within(m.queue.summary()).await?;
    let open = m.destinations.snapshot();
    for row in &mut rows {
        // Delivery names a destination by its first next hop, plus the
        // source address when one is set.
        row.associations = open
            .iter()
            .filter(|d| d.name == row.name || d.name.starts_with(&format!("{} from ", row.name)))
            .map(|d| d.associations)
            .sum();
    }
    Ok(Json(rows))
}

pub(super) async fn show(
    State(s): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Answer<MessageDetail> {
    let m = mail(&s)?;
    let Some(qid) = ops::parse_id(&id) else {
        return problem(StatusCode::BAD_REQUEST, format!("{id:?} is not a queue id"));
    };
    let Json(found) = within(m.queue.show(qid)).await?;
    let Some(mut detail) = found else {
        return problem(
            StatusCode::NOT_FOUND,
            format!("no message {id} in the queue"),
        );
    };
    let body = tokio::time::timeout(ACTION_DEADLINE, m.spool.body(qid)).await;
    detail.headers = match body {
        Ok(Ok(body)) => headers(&body),
        Ok(Err(e)) => format!("(cannot read the content: {e})"),
        Err(_) => "(the spool did not answer in time)".into(),
    };
    if let Some(holders) = m.replicated.as_ref().and_then(|r| r.holders(qid)) {
        detail.copies = holders.iter().map(|h| super::node_name(&s, *h)).collect();
    }
    Ok(Json(detail))
}

/// The header section: up to the first empty line, at most MAX_HEADERS.
fn headers(body: &[u8]) -> String {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(body.len(), |p| p + 2)
        .min(MAX_HEADERS);
    String::from_utf8_lossy(&body[..end]).into_owned()
}

pub(super) async fn act(
    State(s): State<Arc<AdminState>>,
    Path(op): Path<String>,
    Json(sel): Json<Selector>,
) -> Answer<Acted> {
    let m = mail(&s)?;
    let op = match op.as_str() {
        "flush" => Op::Flush,
        "hold" => Op::Hold,
        "release" => Op::Release,
        "delete" => Op::Delete,
        "bounce" => Op::Bounce,
        other => return problem(StatusCode::NOT_FOUND, format!("no queue action {other:?}")),
    };
    if let Err(why) = check_state(&sel.filter.state) {
        return problem(StatusCode::BAD_REQUEST, why);
    }
    let Json(done) = within(m.queue.act(op, sel)).await?;
    match done {
        Ok(changed) => Ok(Json(Acted { op, changed })),
        Err(why) => problem(StatusCode::BAD_REQUEST, why),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn headers_end_at_the_first_empty_line() {
        let body = b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n\r\nmore";
        assert_eq!(super::headers(body), "Subject: hi\r\nFrom: a@b\r\n");
        assert_eq!(super::headers(b"X: y\r\n"), "X: y\r\n");
    }
}
