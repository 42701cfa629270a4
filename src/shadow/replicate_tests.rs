use std::collections::HashMap;

use super::*;
use crate::shadow::Holder;
use crate::spool::disk::Limits;
use crate::spool::{MemorySpool, Recipient};

/// How a fake member answers.
#[derive(Clone)]
enum Mode {
    /// A real holder in a temporary directory.
    Holds(Holder),
    /// Every call succeeds at once, nothing kept (for paused time: a
    /// real holder's disk writes happen on real time).
    Accepts,
    /// Every call fails.
    Fails,
    /// No call is ever answered.
    Hangs,
}

/// Members in-process: each call is logged, then answered as its mode says.
struct Fake {
    me: NodeId,
    modes: Mutex<BTreeMap<NodeId, Mode>>,
    calls: Mutex<Vec<(NodeId, ShadowRequest, bool)>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Fake {
    /// `n` members holding copies (ids 1..=n), this node being 100.
    fn new(n: u64) -> Arc<Fake> {
        let mut modes = BTreeMap::new();
        let mut dirs = Vec::new();
        for id in 1..=n {
            let dir = tempfile::tempdir().unwrap();
            let holder = Holder::open(dir.path(), Limits::default()).unwrap();
            modes.insert(id, Mode::Holds(holder));
            dirs.push(dir);
        }
        Arc::new(Fake {
            me: 100,
            modes: Mutex::new(modes),
            calls: Mutex::default(),
            _dirs: dirs,
        })
    }

    fn set(&self, id: NodeId, mode: Mode) {
        self.modes.lock().unwrap().insert(id, mode);
    }

    fn holder(&self, id: NodeId) -> Holder {
        match &self.modes.lock().unwrap()[&id] {
            Mode::Holds(h) => h.clone(),
            _ => panic!("{id} holds nothing"),
        }
    }

    /// Ids of this node's shadows on member `id`.
    fn shadows(&self, id: NodeId) -> Vec<u64> {
        let h = self.holder(id);
        h.envelopes(self.me).iter().map(|e| e.id.0).collect()
    }

    /// Progress calls: (to, request, answered by an accepting member).
    fn progress_calls(&self) -> Vec<(NodeId, ShadowRequest, bool)> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(_, r, _)| matches!(r, ShadowRequest::Progress { .. }))
            .cloned()
            .collect()
    }
}

impl Replicas for Fake {
    fn me(&self) -> NodeId {
        self.me
    }

    fn candidates(&self) -> Vec<NodeId> {
        self.modes.lock().unwrap().keys().copied().collect()
    }

    fn is_member(&self, node: NodeId) -> bool {
        self.modes.lock().unwrap().contains_key(&node)
    }

    fn call(
        &self,
        to: NodeId,
        req: ShadowRequest,
        _timeout: Duration,
    ) -> BoxFuture<'static, Result<ShadowReply, String>> {
        let mode = self.modes.lock().unwrap().get(&to).cloned();
        let accepted = matches!(mode, Some(Mode::Accepts));
        self.calls.lock().unwrap().push((to, req.clone(), accepted));
        let me = self.me;
        Box::pin(async move {
            match mode {
                Some(Mode::Holds(h)) => {
                    use crate::cluster::rpc::shadow::ShadowHandler;
                    Ok(h.handle(me, req).await)
                }
                Some(Mode::Accepts) => Ok(match req {
                    ShadowRequest::Store { .. } => ShadowReply::Stored,
                    ShadowRequest::Part { .. } => ShadowReply::Staged,
                    ShadowRequest::Progress { .. } => ShadowReply::Applied,
                    ShadowRequest::Reconcile { .. } => ShadowReply::Reconciled { discarded: 0 },
                }),
                Some(Mode::Fails) => Err("refused".into()),
                Some(Mode::Hangs) => std::future::pending().await,
                None => Err("not a member".into()),
            }
        })
    }
}

fn envelope(id: u64, rcpts: usize) -> Envelope {
    Envelope {
        id: QueueId(id),
        sender: "s@example.test".into(),
        recipients: (0..rcpts)
            .map(|i| Recipient {
                address: format!("r{i}@dest.example"),
                state: RcptState::Pending { attempts: 0 },
            })
            .collect(),
        arrived_ms: 1,
        holders: Vec::new(),
    }
}

fn body() -> Bytes {
    Bytes::from_static(b"Subject: x\r\n\r\nbody\r\n")
}

fn spool(local: &MemorySpool, fake: &Arc<Fake>, replicas: u8, min: u8) -> ReplicatedSpool {
    ReplicatedSpool::new(
        Arc::new(local.clone()),
        fake.clone(),
        Settings::new(replicas, min),
        CancellationToken::new(),
    )
}

fn holders_here(local: &MemorySpool, id: u64) -> Vec<NodeId> {
    let all = local.envelopes();
    all.iter().find(|e| e.id.0 == id).unwrap().holders.clone()
}

#[test]
fn holders_spread_over_the_members_and_are_distinct() {
    let members = [11, 22, 33, 44, 55];
    let mut picked: HashMap<NodeId, usize> = HashMap::new();
    for id in 0..2000u64 {
        let chosen = choose(QueueId((1 << 40) + id), &members, 2);
        assert_eq!(chosen.len(), 2);
        assert_ne!(chosen[0], chosen[1]);
        assert_eq!(chosen, choose(QueueId((1 << 40) + id), &members, 2));
        for c in chosen {
            *picked.entry(c).or_default() += 1;
        }
    }
    // 800 each on average; none is left out or takes the lot.
    for m in members {
        let n = picked.get(&m).copied().unwrap_or(0);
        assert!(
            (600..=1000).contains(&n),
            "{m} picked {n} times: {picked:?}"
        );
    }
    // Fewer members than wanted: all of them.
    assert_eq!(choose(QueueId(1), &[7], 2), vec![7]);
}

#[tokio::test]
async fn a_message_is_on_replicas_minus_one_holders_before_store_returns() {
    let fake = Fake::new(3);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 3, 1);
    for id in 1..=20 {
        s.store(envelope(id, 1), body()).await.unwrap();
        let holders = holders_here(&local, id);
        assert_eq!(holders.len(), 2, "{id}");
        for h in &holders {
            assert!(fake.shadows(*h).contains(&id), "{id} not on {h}");
        }
        assert_eq!(s.holders(QueueId(id)), Some(holders));
    }
    // Every member holds some: the copies spread.
    for h in 1..=3 {
        assert!(!fake.shadows(h).is_empty(), "{h} holds none");
    }
    assert!(s.underreplicated().is_empty());
    let total: usize = s.shadows_per_holder().values().sum();
    assert_eq!(total, 40);
}

#[tokio::test]
async fn a_failing_holder_is_struck_off_and_the_message_is_underreplicated() {
    let fake = Fake::new(2);
    fake.set(2, Mode::Fails);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 3, 2);
    s.store(envelope(1, 1), body()).await.unwrap();
    assert_eq!(holders_here(&local, 1), vec![1]);
    assert_eq!(fake.shadows(1), vec![1]);
    assert_eq!(s.underreplicated(), vec![QueueId(1)]);
    // After a restart the record still says so.
    let again = spool(&local.reopen(), &fake, 3, 2);
    assert_eq!(again.underreplicated(), vec![QueueId(1)]);
    assert_eq!(again.holders(QueueId(1)), Some(vec![1]));
}

#[tokio::test]
async fn below_min_replicas_nothing_is_kept_or_acknowledged() {
    // The only other member fails.
    let fake = Fake::new(1);
    fake.set(1, Mode::Fails);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 2, 2);
    let r = s.store(envelope(1, 1), body()).await;
    assert!(
        matches!(r, Err(SpoolError::Replicas { made: 1, needed: 2 })),
        "{r:?}"
    );
    assert!(local.envelopes().is_empty());
    // No other member at all.
    let alone = Fake::new(0);
    let s = spool(&local, &alone, 2, 2);
    let r = s.store(envelope(2, 1), body()).await;
    assert!(matches!(r, Err(SpoolError::Replicas { .. })), "{r:?}");
    assert!(local.envelopes().is_empty());
}

#[tokio::test]
async fn a_message_larger_than_one_call_goes_in_parts() {
    use crate::cluster::rpc::shadow::MAX_SHADOW_PART;
    let fake = Fake::new(1);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 2, 2);
    let large: Bytes = (0..2 * MAX_SHADOW_PART + 5).map(|i| i as u8).collect();
    s.store(envelope(1, 1), large.clone()).await.unwrap();
    assert_eq!(fake.holder(1).body(100, QueueId(1)).await.unwrap(), large);
    let parts: Vec<u64> = fake
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, r, _)| match r {
            ShadowRequest::Part { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect();
    assert_eq!(parts, vec![0, MAX_SHADOW_PART as u64]);
}

#[tokio::test]
async fn a_local_failure_fails_the_store_and_the_copies_made_are_forgotten() {
    let fake = Fake::new(1);
    let local = MemorySpool::new();
    local.fail_fsync(true);
    let s = spool(&local, &fake, 2, 1);
    assert!(s.store(envelope(1, 1), body()).await.is_err());
    // The holder hears of it with the next progress.
    let holder = fake.holder(1);
    let mut waited = 0;
    while !fake.shadows(1).is_empty() {
        assert!(waited < 500, "shadow never forgotten");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    assert!(holder.envelopes(100).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_hung_holder_costs_the_store_timeout_not_the_client() {
    let fake = Fake::new(1);
    fake.set(1, Mode::Hangs);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 2, 1);
    let started = tokio::time::Instant::now();
    s.store(envelope(1, 1), body()).await.unwrap();
    assert_eq!(started.elapsed(), Settings::new(2, 1).store_timeout);
    assert_eq!(holders_here(&local, 1), Vec::<NodeId>::new());
    assert_eq!(s.underreplicated(), vec![QueueId(1)]);
}

#[tokio::test(start_paused = true)]
async fn progress_is_batched_to_each_holder() {
    let fake = Fake::new(1);
    fake.set(1, Mode::Accepts);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 2, 1);
    for id in 1..=3 {
        s.store(envelope(id, 2), body()).await.unwrap();
    }
    s.update(QueueId(1), vec![(0, RcptState::Done)])
        .await
        .unwrap();
    // Attempts are not forwarded.
    s.update(QueueId(2), vec![(1, RcptState::Pending { attempts: 1 })])
        .await
        .unwrap();
    s.update(QueueId(2), vec![(0, RcptState::Done)])
        .await
        .unwrap();
    s.update(QueueId(3), vec![(0, RcptState::Done)])
        .await
        .unwrap();
    s.remove(QueueId(3)).await.unwrap();
    assert!(fake.progress_calls().is_empty(), "sent before the delay");
    tokio::time::sleep(Settings::new(2, 1).batch_delay * 2).await;
    let calls = fake.progress_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        calls[0],
        (
            1,
            ShadowRequest::Progress {
                done: vec![(1, vec![0]), (2, vec![0])],
                removed: vec![3],
            },
            true
        )
    );
}

#[tokio::test]
async fn finished_messages_leave_their_holders() {
    let fake = Fake::new(2);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 3, 1);
    for id in 1..=3 {
        s.store(envelope(id, 2), body()).await.unwrap();
    }
    s.update(QueueId(1), vec![(0, RcptState::Done)])
        .await
        .unwrap();
    s.update(QueueId(2), vec![(0, RcptState::Done), (1, RcptState::Done)])
        .await
        .unwrap();
    s.remove(QueueId(2)).await.unwrap();
    s.remove(QueueId(3)).await.unwrap();
    for h in [1, 2] {
        let mut polls = 0;
        while fake.shadows(h) != vec![1] {
            assert!(polls < 500, "{h} holds {:?}", fake.shadows(h));
            tokio::time::sleep(Duration::from_millis(10)).await;
            polls += 1;
        }
        let one = &fake.holder(h).envelopes(100)[0];
        assert_eq!(one.recipients[0].state, RcptState::Done);
        assert_eq!(one.recipients[1].state, RcptState::Pending { attempts: 0 });
    }
}

#[tokio::test(start_paused = true)]
async fn progress_to_a_failing_holder_is_retried_until_it_takes_it() {
    let fake = Fake::new(1);
    fake.set(1, Mode::Accepts);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 2, 1);
    s.store(envelope(1, 1), body()).await.unwrap();
    fake.set(1, Mode::Fails);
    s.remove(QueueId(1)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed = fake.progress_calls();
    assert!(
        failed.len() >= 2 && failed.iter().all(|c| !c.2),
        "{failed:?}"
    );
    fake.set(1, Mode::Accepts);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let calls = fake.progress_calls();
    let last = calls.last().unwrap();
    assert!(last.2, "{calls:?}");
    assert_eq!(
        last.1,
        ShadowRequest::Progress {
            done: vec![],
            removed: vec![1]
        }
    );
    // Taken: nothing more is sent.
    let n = calls.len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(fake.progress_calls().len(), n);
}

#[tokio::test]
async fn repair_copies_underreplicated_messages_once_a_member_can_take_them() {
    let fake = Fake::new(2);
    let holder = fake.holder(2);
    fake.set(2, Mode::Fails);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 3, 1);
    s.store(envelope(1, 2), body()).await.unwrap();
    s.update(QueueId(1), vec![(1, RcptState::Done)])
        .await
        .unwrap();
    assert_eq!(s.underreplicated(), vec![QueueId(1)]);
    assert_eq!(s.repair().await, 0);
    fake.set(2, Mode::Holds(holder));
    assert_eq!(s.repair().await, 1);
    assert!(s.underreplicated().is_empty());
    let mut holders = holders_here(&local, 1);
    holders.sort_unstable();
    assert_eq!(holders, vec![1, 2]);
    // The new copy has the recipient done since.
    let copy = &fake.holder(2).envelopes(100)[0];
    assert_eq!(copy.recipients[1].state, RcptState::Done);
}

#[tokio::test]
async fn a_holder_that_left_is_replaced() {
    let fake = Fake::new(2);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 2, 1);
    for id in 1..=10 {
        s.store(envelope(id, 1), body()).await.unwrap();
    }
    let on_one = fake.shadows(1);
    assert!(!on_one.is_empty());
    fake.modes.lock().unwrap().remove(&1);
    assert_eq!(s.repair().await, on_one.len());
    for id in 1..=10 {
        assert_eq!(holders_here(&local, id), vec![2], "{id}");
    }
    assert_eq!(fake.shadows(2), (1..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_message_whose_holder_left_counts_as_underreplicated_while_it_is_gone() {
    let fake = Fake::new(1);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 2, 1);
    s.store(envelope(1, 1), body()).await.unwrap();
    assert!(s.underreplicated().is_empty());
    let holder = fake.holder(1);
    fake.modes.lock().unwrap().remove(&1);
    assert_eq!(s.repair().await, 0);
    assert_eq!(s.underreplicated(), vec![QueueId(1)]);
    // Nobody to copy it to: the record keeps the holder, whose copy is
    // still there should it come back.
    assert_eq!(holders_here(&local, 1), vec![1]);
    fake.set(1, Mode::Holds(holder));
    assert_eq!(s.repair().await, 0, "nothing to copy");
    assert!(s.underreplicated().is_empty());
}

#[tokio::test]
async fn reconcile_makes_holders_forget_what_the_primary_no_longer_has() {
    let fake = Fake::new(1);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 2, 1);
    for id in 1..=3 {
        s.store(envelope(id, 1), body()).await.unwrap();
    }
    // A progress lost: the holder keeps a shadow of a message long gone.
    fake.holder(1)
        .store(100, shadow_of(&envelope(0, 1), &body()))
        .await
        .unwrap();
    assert_eq!(fake.shadows(1), vec![0, 1, 2, 3]);
    assert_eq!(s.reconcile().await, 1);
    assert_eq!(fake.shadows(1), vec![1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_member_that_comes_up_is_reconciled_with_at_once() {
    let fake = Fake::new(1);
    fake.set(1, Mode::Accepts);
    let s = Arc::new(spool(&MemorySpool::new(), &fake, 2, 1));
    let cancel = CancellationToken::new();
    let every = Duration::from_secs(3);
    let task = tokio::spawn(repair::run(
        s.clone(),
        every,
        Duration::from_secs(3600),
        cancel.clone(),
    ));
    let reconciled = || -> Vec<NodeId> {
        let calls = fake.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(_, r, _)| matches!(r, ShadowRequest::Reconcile { .. }))
            .map(|(to, _, _)| *to)
            .collect()
    };
    tokio::time::sleep(every / 2).await;
    assert_eq!(reconciled(), vec![1], "at the start");
    fake.set(2, Mode::Accepts);
    tokio::time::sleep(every).await;
    assert_eq!(reconciled(), vec![1, 2], "2 came up");
    tokio::time::sleep(every * 3).await;
    assert_eq!(reconciled(), vec![1, 2], "once each");
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_flush_sends_waiting_progress_without_the_batch_delay() {
    let fake = Fake::new(2);
    fake.set(1, Mode::Accepts);
    fake.set(2, Mode::Fails);
    let local = MemorySpool::new();
    let s = spool(&local, &fake, 2, 1);
    let mut ids = Vec::new();
    // 2's copies fail: only 1 holds any, and only 1 hears of progress.
    for id in 1..=4 {
        s.store(envelope(id, 1), body()).await.unwrap();
        ids.push(id);
    }
    for id in &ids {
        s.update(QueueId(*id), vec![(0, RcptState::Done)])
            .await
            .unwrap();
    }
    let started = tokio::time::Instant::now();
    s.flush(Duration::from_secs(5)).await;
    assert!(started.elapsed() < Settings::new(2, 1).batch_delay);
    let calls = fake.progress_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let ShadowRequest::Progress { done, .. } = &calls[0].1 else {
        unreachable!()
    };
    let sent: Vec<u64> = done.iter().map(|(id, _)| *id).collect();
    let on_one: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|id| holders_here(&local, *id) == vec![1])
        .collect();
    assert_eq!(sent, on_one);
    // Nothing waits: a second flush returns at once, sending nothing.
    s.flush(Duration::from_secs(5)).await;
    assert_eq!(fake.progress_calls().len(), 1);
}
