//! The spool's writer thread: group commit of every pending request with
//! one write and one fsync, the index kept in step, segment rotation and
//! compaction (see the parent module for the rules).

use super::*;

/// The one thread that writes the spool's files.
pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) file: Option<File>,
    pub(super) active: u32,
    /// The active segment's durable length.
    pub(super) len: u64,
    /// New records (not copies) in the active segment: it closes when
    /// they reach `segment_bytes`.
    pub(super) fresh: u64,
    pub(super) buf: Vec<u8>,
    pub(super) limits: Limits,
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            let mut size = 0;
            while size < BATCH_LIMIT {
                match rx.try_recv() {
                    Ok(r) => {
                        if let Op::Store(_, b) = &r.op {
                            size += b.len();
                        }
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            let result = self.commit(&batch);
            for r in batch {
                if let Some(done) = r.done {
                    let _ = done.send(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(copy_error(e)),
                    });
                }
            }
        }
    }

    /// Write and fsync one batch, then bring the index up to date.
    fn commit(&mut self, batch: &[Request]) -> Result<(), SpoolError> {
        if batch.iter().all(|r| matches!(r.op, Op::Probe)) {
            return Ok(());
        }
        if self.file.is_none() {
            self.rotate().map_err(io_error)?;
        } else if self.fresh >= self.limits.segment_bytes {
            self.rotate().map_err(io_error)?;
            let mut budget = 2 * self.limits.segment_bytes;
            while budget > 0 {
                match self.compact() {
                    Ok(0) => break,
                    Ok(copied) => budget = budget.saturating_sub(copied.max(1)),
                    Err(e) => {
                        // Only disk usage suffers; the messages stay put.
                        tracing::warn!(error = %e, "spool compaction failed");
                        break;
                    }
                }
            }
        }
        self.buf.clear();
        let mut stored = Vec::new();
        for r in batch {
            let start = self.buf.len();
            match &r.op {
                Op::Store(env, body) => {
                    let at = record::encode_store(&mut self.buf, env, body);
                    stored.push((at, (self.buf.len() - start) as u64));
                }
                Op::Update(id, changes) => record::encode_update(&mut self.buf, *id, changes),
                Op::Remove(id) => record::encode_remove(&mut self.buf, *id),
                Op::Holders(id, holders) => record::encode_holders(&mut self.buf, *id, holders),
                Op::Probe => {}
            }
        }
        let started = crate::clock::instant();
        let result = self.append();
        self.shared.measure();
        let base = result?;
        self.fresh += self.buf.len() as u64;
        crate::metrics::spool_commit(batch.len(), started.elapsed());
        self.index(batch, base, &stored);
        delete_unreferenced(&self.shared, self.active);
        Ok(())
    }

    /// Append `buf` to the active segment and fsync; returns its offset.
    fn append(&mut self) -> Result<u64, SpoolError> {
        let file = self.file.as_mut().ok_or(SpoolError::Closed)?;
        if let Err(e) = file.write_all(&self.buf).and_then(|_| file.sync_data()) {
            // The tail after the last durable length is unknown: cut it
            // off and go on in this segment. If even that fails, no later
            // record may follow it: a new segment is started next time.
            let cut = file.set_len(self.len).and_then(|()| file.sync_all());
            if cut.is_err() {
                self.file = None;
            }
            return Err(io_error(e));
        }
        let base = self.len;
        let n = self.buf.len() as u64;
        self.len += n;
        self.shared.written.fetch_add(n, Ordering::Relaxed);
        let mut index = self.shared.index.lock().expect("index");
        *index.sizes.entry(self.active).or_default() = self.len;
        Ok(base)
    }

    /// If the spool holds more dead bytes than live ones (and more than
    /// the allowance), copy the live messages of the oldest segment into
    /// the active one (envelope as it now stands, one Store record each),
    /// so the oldest holds nothing live and goes — with the dead segments
    /// behind it. One segment per call; returns the bytes copied (0:
    /// nothing to do).
    fn compact(&mut self) -> Result<u64, SpoolError> {
        let victims: Vec<(Envelope, u32, u64, usize)> = {
            let index = self.shared.index.lock().expect("index");
            let allowance =
                self.limits.max_segments.saturating_sub(1) as u64 * self.limits.segment_bytes;
            let dead = index.disk().saturating_sub(index.live);
            if dead <= index.live.max(allowance) {
                return Ok(0);
            }
            let oldest = match index.refs.keys().next() {
                Some(&n) if n < self.active => n,
                _ => return Ok(0),
            };
            index
                .messages
                .values()
                .filter(|l| l.segments.contains(&oldest))
                .map(|l| (l.envelope.clone(), l.segment, l.body_at, l.body_len))
                .collect()
        };
        self.buf.clear();
        let mut stored = Vec::with_capacity(victims.len());
        for (env, seg, at, len) in &victims {
            let body = read_at(&self.shared, *seg, *at, *len)?;
            let start = self.buf.len();
            let at = record::encode_store(&mut self.buf, env, &body);
            stored.push((at, (self.buf.len() - start) as u64));
        }
        let base = self.append()?;
        let seg = self.active;
        let mut index = self.shared.index.lock().expect("index");
        for ((env, ..), (at, record_len)) in victims.iter().zip(stored) {
            let Some(loc) = index.messages.get_mut(&env.id) else {
                continue;
            };
            // The copy supersedes every earlier record of the message.
            let old = std::mem::replace(&mut loc.segments, vec![seg]);
            loc.segment = seg;
            loc.body_at = base + at as u64;
            let before = std::mem::replace(&mut loc.record_len, record_len);
            index.live = index.live - before + record_len;
            for s in old {
                if let Some(n) = index.refs.get_mut(&s) {
                    *n = n.saturating_sub(1);
                }
            }
            *index.refs.entry(seg).or_default() += 1;
        }
        drop(index);
        delete_unreferenced(&self.shared, self.active);
        self.shared.measure();
        Ok(self.buf.len() as u64)
    }

    fn index(&self, batch: &[Request], base: u64, stored: &[(usize, u64)]) {
        let seg = self.active;
        let mut stores = stored.iter();
        let mut index = self.shared.index.lock().expect("index");
        for r in batch {
            match &r.op {
                Op::Store(env, body) => {
                    let &(at, record_len) = stores.next().expect("one offset per store");
                    // A re-store (compaction copy) keeps the old segments
                    // referenced: they still hold records of this message.
                    let mut segments = index
                        .remove(&env.id)
                        .map(|l| l.segments)
                        .unwrap_or_default();
                    if !segments.contains(&seg) {
                        segments.push(seg);
                        *index.refs.entry(seg).or_default() += 1;
                    }
                    index.insert(
                        env.id,
                        Location {
                            envelope: env.clone(),
                            segment: seg,
                            body_at: base + at as u64,
                            body_len: body.len(),
                            record_len,
                            segments,
                        },
                    );
                }
                Op::Update(id, _) | Op::Holders(id, _) => {
                    let added = match index.messages.get_mut(id) {
                        Some(loc) => {
                            match &r.op {
                                Op::Update(_, changes) => apply(&mut loc.envelope, changes),
                                Op::Holders(_, h) => loc.envelope.holders.clone_from(h),
                                Op::Store(..) | Op::Remove(_) | Op::Probe => {}
                            }
                            let new = !loc.segments.contains(&seg);
                            if new {
                                loc.segments.push(seg);
                            }
                            new
                        }
                        None => false,
                    };
                    if added {
                        *index.refs.entry(seg).or_default() += 1;
                    }
                }
                Op::Probe => {}
                Op::Remove(id) => {
                    if let Some(loc) = index.remove(id) {
                        for s in loc.segments {
                            if let Some(n) = index.refs.get_mut(&s) {
                                *n = n.saturating_sub(1);
                            }
                        }
                    }
                }
            }
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        let next = self.active + 1;
        let file = open_segment(&self.shared.dir, next)?;
        let mut index = self.shared.index.lock().expect("index");
        index.refs.insert(next, 0);
        index.sizes.insert(next, 0);
        drop(index);
        self.file = Some(file);
        self.active = next;
        self.len = 0;
        self.fresh = 0;
        Ok(())
    }
}

fn copy_error(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::Full => SpoolError::Full,
        SpoolError::Io(io) => SpoolError::Io(io::Error::new(io.kind(), io.to_string())),
        SpoolError::NotFound(id) => SpoolError::NotFound(*id),
        SpoolError::Corrupt(s) => SpoolError::Corrupt(s.clone()),
        SpoolError::Closed => SpoolError::Closed,
        SpoolError::Replicas { made, needed } => SpoolError::Replicas {
            made: *made,
            needed: *needed,
        },
    }
}
