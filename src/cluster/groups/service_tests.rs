use super::*;
use crate::cluster::raft::store::raft_tests::{single_leader, ME};
use crate::cluster::rpc::group::GrantRefusal;
use crate::cluster::state::groups::GroupStatus;

const TTL_MS: u64 = 600;

fn ident(incarnation: NodeId) -> Identity {
    Identity {
        name: format!("n{incarnation:x}"),
        incarnation,
    }
}

fn grant(epoch: u64) -> GroupRequest {
    GroupRequest::Grant {
        group: "mta".into(),
        epoch,
        ttl_ms: TTL_MS,
    }
}

async fn write(raft: &Raft<TypeConfig>, cmd: GroupCommand) {
    raft.client_write(Command::Group(cmd)).await.unwrap();
}

fn assign(epoch: u64, owner: NodeId) -> GroupCommand {
    GroupCommand::Assign {
        group: "mta".into(),
        epoch,
        owner: Some(owner),
        reason: "t".into(),
        at_ms: 1,
        takers: Default::default(),
    }
}

#[tokio::test]
async fn a_voter_grants_the_owner_and_reports_outstanding_after_the_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, view) = single_leader(dir.path()).await;
    let svc = GroupService::new(ident(ME), raft.clone(), view, dir.path().join("longest"));
    let owner = ident(7);
    let refused = svc.handle(&owner, grant(1)).await;
    let unknown = GroupReply::Refused(GrantRefusal::UnknownGroup.into());
    assert_eq!(refused, unknown);
    write(&raft, assign(1, 7)).await;
    assert_eq!(
        svc.handle(&owner, grant(1)).await,
        GroupReply::Granted { ttl_ms: TTL_MS }
    );
    let other = svc.handle(&ident(8), grant(1)).await;
    assert!(
        matches!(
            other,
            GroupReply::Refused(Refusal::Grant(GrantRefusal::OtherOwner { .. }))
        ),
        "not the owner: {other:?}"
    );
    let ask = GroupRequest::Outstanding {
        group: "mta".into(),
        epoch: 1,
    };
    // Not revoked here yet: the voter cannot say.
    assert_eq!(
        svc.handle(&ident(ME), ask.clone()).await,
        GroupReply::Outstanding { remaining_ms: None }
    );
    let revoke = GroupCommand::Revoke {
        group: "mta".into(),
        epoch: 1,
        reason: "t".into(),
        at_ms: 2,
    };
    write(&raft, revoke).await;
    match svc.handle(&ident(ME), ask).await {
        GroupReply::Outstanding {
            remaining_ms: Some(ms),
        } => assert!(ms <= TTL_MS, "{ms}"),
        other => panic!("{other:?}"),
    }
    // Revoked: no more grants for the epoch.
    let late = svc.handle(&owner, grant(1)).await;
    let over = GroupReply::Refused(GrantRefusal::EpochOver.into());
    assert_eq!(late, over);
    raft.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_leader_records_reports_only_about_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, view) = single_leader(dir.path()).await;
    let svc = GroupService::new(
        ident(ME),
        raft.clone(),
        view.clone(),
        dir.path().join("longest"),
    );
    write(&raft, assign(1, 7)).await;
    let report = |node| {
        GroupRequest::Record(GroupCommand::Report {
            group: "mta".into(),
            epoch: 1,
            node,
            status: GroupStatus::Online,
            reason: "started".into(),
            at_ms: 3,
        })
    };
    let forged = svc.handle(&ident(8), report(7)).await;
    assert_eq!(forged, GroupReply::Refused(Refusal::NotItsOwn));
    assert_eq!(svc.handle(&ident(7), report(7)).await, GroupReply::Recorded);
    assert_eq!(
        view.borrow().state.groups["mta"].status,
        GroupStatus::Online
    );
    let revoke = GroupRequest::Record(GroupCommand::Revoke {
        group: "mta".into(),
        epoch: 1,
        reason: "forged".into(),
        at_ms: 4,
    });
    let refused = svc.handle(&ident(7), revoke).await;
    assert_eq!(refused, GroupReply::Refused(Refusal::NotItsOwn));
    let move_req = GroupRequest::Record(GroupCommand::Move {
        group: "mta".into(),
        to: Some(8),
        at_ms: 5,
    });
    assert_eq!(svc.handle(&ident(9), move_req).await, GroupReply::Recorded);
    assert_eq!(view.borrow().state.groups["mta"].move_to, Some(8));
    raft.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restarted_voter_vouches_for_the_longest_lease_it_ever_promised() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, view) = single_leader(dir.path()).await;
    let record = dir.path().join("longest");
    write(&raft, assign(1, 7)).await;
    let before = GroupService::new(ident(ME), raft.clone(), view.clone(), record.clone());
    let long = GroupRequest::Grant {
        group: "mta".into(),
        epoch: 1,
        ttl_ms: 5_000,
    };
    assert_eq!(
        before.handle(&ident(7), long).await,
        GroupReply::Granted { ttl_ms: 5_000 }
    );
    let revoke = GroupCommand::Revoke {
        group: "mta".into(),
        epoch: 1,
        reason: "t".into(),
        at_ms: 2,
    };
    write(&raft, revoke).await;
    // Restarted — the promise forgotten, the record kept: it still
    // answers as if it had promised 5 s from its start.
    drop(before);
    let after = GroupService::new(ident(ME), raft.clone(), view, record);
    let ask = GroupRequest::Outstanding {
        group: "mta".into(),
        epoch: 1,
    };
    match after.handle(&ident(ME), ask).await {
        GroupReply::Outstanding {
            remaining_ms: Some(ms),
        } => assert!(ms > TTL_MS, "{ms}: vouches for the 5 s, not a default"),
        other => panic!("{other:?}"),
    }
    raft.shutdown().await.unwrap();
}
