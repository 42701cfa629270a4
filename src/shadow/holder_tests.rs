use super::*;
use crate::cluster::rpc::shadow::ShadowRecipient;

const P: NodeId = 0xAAAA;
const Q: NodeId = 0xBBBB;

fn message(id: u64, rcpts: usize) -> ShadowMessage {
    ShadowMessage {
        id,
        sender: format!("s{id}@example.test"),
        recipients: (0..rcpts)
            .map(|i| ShadowRecipient {
                address: format!("r{i}@dest.example"),
                done: false,
            })
            .collect(),
        arrived_ms: 1_000 + id,
        staged: 0,
        epoch: 0,
        body: format!("Subject: {id}\r\n\r\nbody\r\n").into(),
    }
}

fn open(dir: &Path) -> Holder {
    Holder::open(dir, Limits::default()).unwrap()
}

fn ids(h: &Holder, primary: NodeId) -> Vec<u64> {
    h.envelopes(primary).iter().map(|e| e.id.0).collect()
}

#[tokio::test]
async fn copies_are_kept_per_primary_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let h = open(dir.path());
        let r = h.handle(
            P,
            ShadowRequest::Store {
                message: message(1, 2),
            },
        );
        assert_eq!(r.await, ShadowReply::Stored);
        h.store(P, message(2, 1)).await.unwrap();
        h.store(Q, message(1, 1)).await.unwrap();
        assert_eq!(h.counts(), BTreeMap::from([(P, 2), (Q, 1)]));
    }
    let h = open(dir.path());
    assert_eq!(h.primaries(), vec![P, Q]);
    assert_eq!(ids(&h, P), vec![1, 2]);
    assert_eq!(ids(&h, Q), vec![1]);
    let body = h.body(P, QueueId(2)).await.unwrap();
    assert_eq!(&body[..], b"Subject: 2\r\n\r\nbody\r\n");
    assert!(dir.path().join(format!("{P:016x}")).is_dir());
}

#[tokio::test]
async fn progress_marks_recipients_done_and_removes_finished_messages() {
    let dir = tempfile::tempdir().unwrap();
    {
        let h = open(dir.path());
        for id in 1..=4 {
            h.store(P, message(id, 2)).await.unwrap();
        }
        let req = ShadowRequest::Progress {
            // 1: one of two done; 2: both done (finished); 9: unknown.
            done: vec![(1, vec![1]), (2, vec![0, 1]), (9, vec![0])],
            removed: vec![3],
        };
        assert_eq!(h.handle(P, req).await, ShadowReply::Applied);
        assert_eq!(ids(&h, P), vec![1, 4]);
        // Another primary's progress does not touch P's shadows.
        h.progress(Q, vec![(1, vec![0])], vec![4]).await.unwrap();
        assert_eq!(ids(&h, P), vec![1, 4]);
    }
    let h = open(dir.path());
    assert_eq!(ids(&h, P), vec![1, 4]);
    let one = &h.envelopes(P)[0];
    assert_eq!(one.recipients[0].state, RcptState::Pending { attempts: 0 });
    assert_eq!(one.recipients[1].state, RcptState::Done);
}

#[tokio::test]
async fn reconcile_discards_what_the_primary_forgot_below_its_mark() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path());
    for id in [1, 2, 3, 10, 11] {
        h.store(P, message(id, 1)).await.unwrap();
    }
    let req = ShadowRequest::Reconcile {
        keep: vec![2],
        below: 10,
    };
    assert_eq!(
        h.handle(P, req).await,
        ShadowReply::Reconciled { discarded: 2 }
    );
    assert_eq!(ids(&h, P), vec![2, 10, 11]);
    drop(h);
    assert_eq!(ids(&open(dir.path()), P), vec![2, 10, 11]);
}

fn store(n: u64) -> ShadowRequest {
    ShadowRequest::Store {
        message: message(n, 1),
    }
}

#[tokio::test]
async fn a_takeover_detaches_what_was_held_and_later_copies_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path());
    h.store(P, message(1, 1)).await.unwrap();
    h.store(P, message(2, 1)).await.unwrap();
    h.store(Q, message(7, 1)).await.unwrap();
    h.discard(P, QueueId(2)).await.unwrap();
    // Fenced: its copies are refused.
    h.admit_with(Arc::new(|p, _| match p {
        P => Err("fenced".into()),
        _ => Ok(()),
    }));
    assert!(matches!(h.handle(P, store(3)).await, ShadowReply::Failed(w) if w == "fenced"));
    assert_eq!(h.handle(Q, store(8)).await, ShadowReply::Stored);
    let d = h.detach(P, 4, true).await.unwrap().expect("P had a shelf");
    assert_eq!((d.primary, d.epoch, h.done(P)), (P, 4, 4));
    let held: Vec<u64> = d.envelopes().iter().map(|e| e.id.0).collect();
    assert_eq!(held, vec![1]);
    assert_eq!(&d.body(QueueId(1)).await.unwrap()[..11], b"Subject: 1\r");
    // Back under a new epoch: its copies go to a new shelf.
    h.admit_with(Arc::new(|_, _| Ok(())));
    assert_eq!(h.handle(P, store(5)).await, ShadowReply::Stored);
    assert_eq!(ids(&h, P), vec![5]);
    // A restart resumes the detached shelf and remembers the epoch.
    drop(h);
    let h = open(dir.path());
    let resumed = h.resume();
    assert_eq!(resumed.len(), 1);
    assert_eq!((resumed[0].primary, resumed[0].epoch, h.done(P)), (P, 4, 4));
    assert_eq!(ids(&h, P), vec![5]);
    assert_eq!(ids(&h, Q), vec![7, 8]);
    let d = resumed.into_iter().next().unwrap();
    d.discard(QueueId(1)).await.unwrap();
    d.finish().unwrap();
    let h2 = open(dir.path());
    assert!(h2.resume().is_empty());
    assert_eq!(h2.done(P), 4);
    // Not a taker: nothing is detached, the epoch is done all the same.
    assert!(h2.detach(Q, 2, false).await.unwrap().is_none());
    assert_eq!((h2.done(Q), ids(&h2, Q)), (2, vec![7, 8]));
}

#[tokio::test]
async fn a_message_in_parts_is_stored_whole_and_a_gap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path());
    let part = |offset: u64, bytes: &'static [u8]| ShadowRequest::Part {
        id: 7,
        offset,
        bytes: Bytes::from_static(bytes),
    };
    assert_eq!(
        h.handle(P, part(0, b"Subject: ")).await,
        ShadowReply::Staged
    );
    assert_eq!(
        h.handle(P, part(9, b"parts\r\n")).await,
        ShadowReply::Staged
    );
    // A part out of order is refused; the primary starts over.
    assert!(matches!(
        h.handle(P, part(3, b"x")).await,
        ShadowReply::Failed(_)
    ));
    let mut m = message(7, 1);
    m.staged = 16;
    m.body = Bytes::from_static(b"\r\nbody\r\n");
    assert_eq!(
        h.handle(P, ShadowRequest::Store { message: m.clone() })
            .await,
        ShadowReply::Stored
    );
    let body = h.body(P, QueueId(7)).await.unwrap();
    assert_eq!(&body[..], b"Subject: parts\r\n\r\nbody\r\n");
    // The parts were used up: the same store again lacks its head.
    assert!(matches!(
        h.handle(P, ShadowRequest::Store { message: m }).await,
        ShadowReply::Failed(_)
    ));
    // Another primary's parts are its own.
    assert_eq!(
        h.handle(Q, part(0, b"Subject: ")).await,
        ShadowReply::Staged
    );
    let mut m = message(7, 1);
    m.staged = 9;
    assert!(matches!(
        h.handle(P, ShadowRequest::Store { message: m }).await,
        ShadowReply::Failed(_)
    ));
}
