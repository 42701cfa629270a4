use super::*;
use crate::spool::Recipient;

fn envelope(id: u64, rcpts: usize) -> Envelope {
    Envelope {
        id: QueueId(id),
        sender: format!("s{id}@example.test"),
        recipients: (0..rcpts)
            .map(|i| Recipient {
                address: format!("r{i}@dest.example"),
                state: RcptState::Pending { attempts: 0 },
            })
            .collect(),
        arrived_ms: 1_000 + id,
        holders: Vec::new(),
    }
}

fn body(id: u64) -> Bytes {
    Bytes::from(format!(
        "Subject: {id}\r\n\r\n{}\r\n",
        "x".repeat(id as usize % 300)
    ))
}

fn ids(spool: &DiskSpool) -> Vec<u64> {
    spool.recovered().iter().map(|r| r.envelope.id.0).collect()
}

#[tokio::test]
async fn stored_messages_survive_reopen_and_removed_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = DiskSpool::open(dir.path()).unwrap();
        for id in 1..=5 {
            spool.store(envelope(id, 2), body(id)).await.unwrap();
        }
        spool.remove(QueueId(2)).await.unwrap();
        spool
            .update(QueueId(3), vec![(1, RcptState::Done)])
            .await
            .unwrap();
        spool
            .update(QueueId(4), vec![(0, RcptState::Done), (1, RcptState::Done)])
            .await
            .unwrap();
    }
    let spool = DiskSpool::open(dir.path()).unwrap();
    // 4 had every recipient done: finished, not recovered.
    assert_eq!(ids(&spool), vec![1, 3, 5]);
    let three = &spool.recovered()[1].envelope;
    assert_eq!(
        three.recipients[0].state,
        RcptState::Pending { attempts: 0 }
    );
    assert_eq!(three.recipients[1].state, RcptState::Done);
    // Bodies are read back from disk after a restart (no cache).
    for id in [1, 3, 5] {
        assert_eq!(spool.body(QueueId(id)).await.unwrap(), body(id));
    }
    assert!(matches!(
        spool.body(QueueId(2)).await,
        Err(SpoolError::NotFound(_))
    ));
}

#[tokio::test]
async fn concurrent_stores_share_fsyncs_and_all_recover() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(DiskSpool::open(dir.path()).unwrap());
    let mut tasks = Vec::new();
    for id in 1..=200u64 {
        let s = spool.clone();
        tasks.push(tokio::spawn(async move {
            s.store(envelope(id, 1), body(id)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    drop(spool);
    let spool = DiskSpool::open(dir.path()).unwrap();
    assert_eq!(ids(&spool), (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_torn_tail_loses_only_the_unacknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = DiskSpool::open(dir.path()).unwrap();
        spool.store(envelope(1, 1), body(1)).await.unwrap();
        spool.store(envelope(2, 1), body(2)).await.unwrap();
    }
    // Cut the last record in half, as a crash mid-write would.
    let seg = segment_path(dir.path(), 1);
    let len = fs::metadata(&seg).unwrap().len();
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 10).unwrap();
    drop(f);
    let spool = DiskSpool::open(dir.path()).unwrap();
    assert_eq!(ids(&spool), vec![1]);
    // New writes go to a fresh segment, never after the torn bytes.
    spool.store(envelope(3, 1), body(3)).await.unwrap();
    drop(spool);
    let spool = DiskSpool::open(dir.path()).unwrap();
    assert_eq!(ids(&spool), vec![1, 3]);
}

#[tokio::test]
async fn segments_without_live_messages_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let count = |d: &Path| {
        fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count()
    };
    {
        let spool = DiskSpool::open(dir.path()).unwrap();
        spool.store(envelope(1, 1), body(1)).await.unwrap();
    }
    {
        // Segment 1 is pinned by message 1; segment 2 is new.
        let spool = DiskSpool::open(dir.path()).unwrap();
        assert_eq!(count(dir.path()), 2);
        spool.remove(QueueId(1)).await.unwrap();
    }
    // Reopen: segment 1 holds nothing live and goes; 2 holds only the
    // Remove and goes too, being oldest; the new active one stays.
    let spool = DiskSpool::open(dir.path()).unwrap();
    assert_eq!(count(dir.path()), 1);
    assert!(ids(&spool).is_empty());
}

#[tokio::test]
async fn a_message_pinned_in_an_old_segment_keeps_its_updates() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = DiskSpool::open(dir.path()).unwrap();
        spool.store(envelope(1, 2), body(1)).await.unwrap();
    }
    {
        let spool = DiskSpool::open(dir.path()).unwrap();
        spool
            .update(QueueId(1), vec![(0, RcptState::Done)])
            .await
            .unwrap();
    }
    {
        let spool = DiskSpool::open(dir.path()).unwrap();
        let e = &spool.recovered()[0].envelope;
        assert_eq!(e.recipients[0].state, RcptState::Done);
        assert_eq!(e.recipients[1].state, RcptState::Pending { attempts: 0 });
        spool
            .update(QueueId(1), vec![(1, RcptState::Pending { attempts: 4 })])
            .await
            .unwrap();
    }
    let spool = DiskSpool::open(dir.path()).unwrap();
    let e = &spool.recovered()[0].envelope;
    assert_eq!(e.recipients[0].state, RcptState::Done);
    assert_eq!(e.recipients[1].state, RcptState::Pending { attempts: 4 });
}

#[tokio::test]
async fn a_long_deferred_message_does_not_pin_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        segment_bytes: 2048,
        max_segments: 3,
        ..Limits::default()
    };
    let segments = |d: &Path| {
        fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count()
    };
    {
        let spool = DiskSpool::open_with(dir.path(), limits).unwrap();
        // Message 1 stays queued the whole time, its state changing once.
        spool.store(envelope(1, 2), body(1)).await.unwrap();
        spool
            .update(QueueId(1), vec![(0, RcptState::Done)])
            .await
            .unwrap();
        // Heavy traffic behind it: each store and remove of ~500 bytes.
        for id in 2..200 {
            spool.store(envelope(id, 1), body(id)).await.unwrap();
            spool.remove(QueueId(id)).await.unwrap();
            assert!(
                segments(dir.path()) <= 4,
                "segments pile up behind message 1"
            );
        }
        assert_eq!(spool.body(QueueId(1)).await.unwrap(), body(1));
    }
    let spool = DiskSpool::open_with(dir.path(), limits).unwrap();
    assert_eq!(ids(&spool), vec![1]);
    let e = &spool.recovered()[0].envelope;
    assert_eq!(e.recipients[0].state, RcptState::Done);
    assert_eq!(e.recipients[1].state, RcptState::Pending { attempts: 0 });
    assert_eq!(spool.body(QueueId(1)).await.unwrap(), body(1));
}

#[tokio::test]
async fn a_probe_is_answered_behind_the_writes_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(dir.path()).unwrap();
    let size = |dir: &std::path::Path| -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    spool.probe().await.unwrap();
    let (store, probe) = (spool.store(envelope(1, 1), body(1)), spool.probe());
    let (stored, probed) = tokio::join!(store, probe);
    stored.unwrap();
    probed.unwrap();
    let before = size(dir.path());
    spool.probe().await.unwrap();
    assert_eq!(size(dir.path()), before, "a probe writes nothing");
}

/// A message of about 1 KiB.
fn kib(id: u64) -> Bytes {
    Bytes::from(format!("Subject: {id}\r\n\r\n{}\r\n", "k".repeat(1000)))
}

#[tokio::test]
async fn writes_stay_under_three_times_the_payload_behind_a_long_deferred_backlog() {
    // Far more live data than max_segments segments: every message stays
    // queued (a dead next hop), deferred now and then.
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        segment_bytes: 16 << 10,
        max_segments: 4,
        ..Limits::default()
    };
    let spool = DiskSpool::open_with(dir.path(), limits).unwrap();
    for id in 1..=400 {
        spool.store(envelope(id, 1), kib(id)).await.unwrap();
    }
    let (written, mut payload) = (spool.bytes_written(), 0);
    for id in 401..=800 {
        let b = kib(id);
        payload += b.len() as u64;
        spool.store(envelope(id, 1), b).await.unwrap();
        let deferred = vec![(0, RcptState::Pending { attempts: 1 })];
        spool.update(QueueId(id - 400), deferred).await.unwrap();
    }
    let ratio = (spool.bytes_written() - written) as f64 / payload as f64;
    assert!(ratio < 3.0, "wrote {ratio:.1}x the payload");
    // And the backlog is intact.
    drop(spool);
    let spool = DiskSpool::open_with(dir.path(), limits).unwrap();
    assert_eq!(spool.recovered().len(), 800);
    assert_eq!(spool.body(QueueId(7)).await.unwrap(), kib(7));
}

#[tokio::test]
async fn dead_data_behind_a_backlog_is_reclaimed() {
    // A backlog, then heavy traffic delivered at once: the disk holds no
    // more than about three times the live data (plus the allowance), and
    // the copying that keeps it so stays under twice what was written.
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        segment_bytes: 16 << 10,
        max_segments: 2,
        ..Limits::default()
    };
    let spool = DiskSpool::open_with(dir.path(), limits).unwrap();
    for id in 1..=100 {
        spool.store(envelope(id, 1), kib(id)).await.unwrap();
    }
    let live = spool.bytes_on_disk();
    let (written, mut payload) = (spool.bytes_written(), 0);
    for id in 101..=3000 {
        let b = kib(id);
        payload += b.len() as u64;
        spool.store(envelope(id, 1), b).await.unwrap();
        spool.remove(QueueId(id)).await.unwrap();
        let bound = 3 * live + 4 * limits.segment_bytes;
        assert!(
            spool.bytes_on_disk() <= bound,
            "{} > {bound}",
            spool.bytes_on_disk()
        );
    }
    let ratio = (spool.bytes_written() - written) as f64 / payload as f64;
    assert!(ratio < 3.0, "wrote {ratio:.1}x the payload");
    assert_eq!(spool.body(QueueId(50)).await.unwrap(), kib(50));
}

#[tokio::test]
async fn past_max_bytes_new_messages_are_refused_and_room_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        segment_bytes: 8 << 10,
        max_segments: 2,
        max_bytes: 40 << 10,
        reserve: 0,
    };
    let spool = DiskSpool::open_with(dir.path(), limits).unwrap();
    let mut stored = Vec::new();
    for id in 1..=100 {
        match spool.store(envelope(id, 1), kib(id)).await {
            Ok(()) => stored.push(id),
            Err(SpoolError::Full) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!((30..=45).contains(&stored.len()), "{}", stored.len());
    assert!(spool.bytes_on_disk() <= limits.max_bytes);
    // Updates and removals still go in; once delivered, room again.
    for &id in &stored {
        spool.remove(QueueId(id)).await.unwrap();
    }
    let mut later = 0;
    for id in 200..=260 {
        if spool.store(envelope(id, 1), kib(id)).await.is_ok() {
            later += 1;
            spool.remove(QueueId(id)).await.unwrap();
        }
    }
    assert_eq!(later, 61, "every later message fits once the rest is gone");
}

#[test]
fn limits_follow_the_filesystem_and_max_size() {
    use crate::config::SpoolSize;
    const GIB: u64 = 1 << 30;
    // A large disk: default segments, 80% of it, a segment kept free.
    let l = Limits::for_filesystem(500 * GIB, SpoolSize::Percent(80));
    assert_eq!(l.max_bytes, 400 * GIB);
    assert_eq!(l.segment_bytes, 64 << 20);
    assert_eq!(l.reserve, 64 << 20);
    // A small one: segments a sixteenth of it, so dead data goes back
    // long before the disk fills; a twentieth kept free.
    let l = Limits::for_filesystem(32 << 20, SpoolSize::Percent(80));
    assert_eq!(l.segment_bytes, 2 << 20);
    assert_eq!(l.reserve, (32 << 20) / 20);
    // A byte cap smaller than the disk sets the segment size too.
    let l = Limits::for_filesystem(500 * GIB, SpoolSize::Bytes(64 << 20));
    assert_eq!((l.max_bytes, l.segment_bytes), (64 << 20, 8 << 20));
}

#[tokio::test]
async fn holders_are_stored_struck_off_and_survive_reopen_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        segment_bytes: 4096,
        max_segments: 1,
        ..Limits::default()
    };
    {
        let spool = DiskSpool::open_with(dir.path(), limits).unwrap();
        let mut e = envelope(1, 2);
        e.holders = vec![0xA, 0xB];
        spool.store(e, body(1)).await.unwrap();
        spool.set_holders(QueueId(1), vec![0xB]).await.unwrap();
        // Enough stored and removed after it that message 1 is copied
        // forward: the copy must keep the holders as they now stand.
        for id in 2..200 {
            spool.store(envelope(id, 1), body(id)).await.unwrap();
            spool.remove(QueueId(id)).await.unwrap();
        }
        assert!(spool.bytes_on_disk() < 64 << 10, "compacted");
    }
    let spool = DiskSpool::open(dir.path()).unwrap();
    let e = &spool.recovered()[0].envelope;
    assert_eq!((e.id, e.holders.clone()), (QueueId(1), vec![0xB]));
    assert_eq!(spool.body(QueueId(1)).await.unwrap(), body(1));
}
