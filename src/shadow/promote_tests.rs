//! The holder's admission rule across a fence, with the real group
//! commands the leader commits: a copy is kept only under the primary's
//! live delivery epoch and never between its promotion and the detach,
//! and progress that races the takeover lands on nothing.

use super::*;
use crate::cluster::rpc::shadow::{
    ShadowHandler, ShadowMessage, ShadowRecipient, ShadowReply, ShadowRequest,
};
use crate::cluster::state::groups::GroupCommand;
use crate::cluster::state::{Member, MemberState, NodeState, Role};
use crate::spool::disk::Limits;
use crate::spool::RcptState;

const P: NodeId = 0xAAAA;
const TAKER: NodeId = 0xBBBB;

fn copy(id: u64, epoch: u64) -> ShadowRequest {
    ShadowRequest::Store {
        message: ShadowMessage {
            id,
            sender: "s@example.test".into(),
            recipients: (0..2)
                .map(|i| ShadowRecipient {
                    address: format!("r{i}@dest.example"),
                    done: false,
                })
                .collect(),
            arrived_ms: 1_000,
            staged: 0,
            epoch,
            body: format!("Subject: {id}\r\n\r\nbody\r\n").into(),
        },
    }
}

/// A view with member P ("node-p") up and its delivery group.
fn view() -> watch::Sender<ClusterView> {
    let mut state = ClusterState::default();
    let member = Member {
        name: "node-p".into(),
        addr: "127.0.0.1:1".into(),
        role: Role::Member,
    };
    state.members.insert(
        P,
        MemberState {
            member,
            state: NodeState::Up,
            since_ms: 0,
        },
    );
    watch::channel(ClusterView {
        last_applied: None,
        state,
    })
    .0
}

/// Commit `c` to P's delivery group, as the leader would.
fn commit(view: &watch::Sender<ClusterView>, c: GroupCommand) {
    view.send_modify(|v| {
        let g = v.state.groups.entry(delivery_group("node-p")).or_default();
        assert_eq!(c.apply(g), crate::cluster::state::Response::Done, "{c:?}");
    });
}

fn assign(epoch: u64, owner: Option<NodeId>, takers: &[NodeId]) -> GroupCommand {
    GroupCommand::Assign {
        group: delivery_group("node-p"),
        epoch,
        owner,
        reason: "test".into(),
        at_ms: epoch,
        takers: takers.iter().copied().collect(),
    }
}

fn revoke(epoch: u64) -> GroupCommand {
    GroupCommand::Revoke {
        group: delivery_group("node-p"),
        epoch,
        reason: "down".into(),
        at_ms: epoch,
    }
}

async fn stored(h: &Holder, req: ShadowRequest) -> bool {
    match h.handle(P, req).await {
        ShadowReply::Stored => true,
        ShadowReply::Failed(_) => false,
        other => panic!("{other:?}"),
    }
}

fn ids(h: &Holder) -> Vec<u64> {
    h.envelopes(P).iter().map(|e| e.id.0).collect()
}

#[tokio::test]
async fn copies_are_kept_only_under_a_live_epoch_and_progress_after_the_takeover_lands_on_nothing()
{
    let dir = tempfile::tempdir().unwrap();
    let h = Holder::open(dir.path(), Limits::default()).unwrap();
    let view = view();
    h.admit_with(admit(view.subscribe(), h.clone()));

    // No delivery epoch yet: refused.
    assert!(!stored(&h, copy(1, 0)).await);
    commit(&view, assign(1, Some(P), &[]));
    assert!(stored(&h, copy(1, 1)).await);
    assert!(stored(&h, copy(2, 1)).await);
    // Under an epoch it does not hold (a stale sender): refused.
    assert!(!stored(&h, copy(3, 2)).await);

    // P is down: its epoch is taken back. A copy still in flight from
    // before is refused — it would miss the takeover.
    commit(&view, revoke(1));
    assert!(!stored(&h, copy(3, 1)).await);
    // The lease surely over, the epoch ends and this node takes over.
    commit(&view, assign(2, None, &[TAKER]));
    assert!(!stored(&h, copy(3, 1)).await, "promoted, not yet detached");
    let d = h.detach(P, 1, true).await.unwrap().expect("held");
    let taken: Vec<u64> = d.envelopes().iter().map(|e| e.id.0).collect();
    assert_eq!(taken, vec![1, 2]);

    // P's last progress arrives after the detach: nothing it names is
    // held any more, so it changes nothing that was taken (recipient 0 of
    // message 1 is then delivered again: the duplicate window).
    let progress = ShadowRequest::Progress {
        done: vec![(1, vec![0])],
        removed: vec![2],
    };
    assert_eq!(h.handle(P, progress).await, ShadowReply::Applied);
    let one = d.envelopes().into_iter().find(|e| e.id.0 == 1).unwrap();
    assert!(one.recipients.iter().all(|r| r.state != RcptState::Done));
    assert_eq!(d.envelopes().len(), 2);

    // Still fenced: refused whatever epoch it names.
    assert!(!stored(&h, copy(4, 1)).await);
    assert!(!stored(&h, copy(4, 2)).await);
    // Back and placed again under epoch 3: its new copies are kept, on a
    // shelf of their own.
    commit(&view, assign(3, Some(P), &[]));
    assert!(stored(&h, copy(4, 3)).await);
    assert_eq!(ids(&h), vec![4]);
}

#[tokio::test]
async fn a_holder_that_missed_the_takeover_refuses_copies_until_it_detached() {
    let dir = tempfile::tempdir().unwrap();
    let h = Holder::open(dir.path(), Limits::default()).unwrap();
    let view = view();
    h.admit_with(admit(view.subscribe(), h.clone()));
    commit(&view, assign(1, Some(P), &[]));
    assert!(stored(&h, copy(1, 1)).await);
    // Fenced and placed on P again before this holder detached (it was
    // slow, or down): P's new copies wait until the old ones are apart.
    commit(&view, revoke(1));
    commit(&view, assign(2, None, &[TAKER]));
    commit(&view, assign(3, Some(P), &[]));
    assert!(!stored(&h, copy(2, 3)).await);
    // Not a taker here: the old copies stay for P, under the old shelf.
    assert!(h.detach(P, 1, false).await.unwrap().is_none());
    assert!(stored(&h, copy(2, 3)).await);
    assert_eq!(ids(&h), vec![1, 2]);
}
