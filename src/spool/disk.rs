//! The durable spool: an append-only segment log with group commit.
//!
//! One writer thread takes every pending request off its channel, appends
//! them all with one write and makes them durable with one `fdatasync`,
//! then answers all of them. Concurrent sessions therefore share fsyncs,
//! which is what makes durable acceptance fast.
//!
//! Segments are deleted oldest first once no live message has a record in
//! them; deleting only from the oldest end keeps every `Remove` record
//! around for as long as the `Store` it cancels. A segment is closed once
//! as many new bytes as `segment_bytes` went into it. Then, if the spool
//! holds more dead bytes than live ones (and more than the allowance of
//! `max_segments`), the live messages of the oldest segments are copied
//! forward so that they, and the dead segments behind them, can go.
//! Copies never count towards closing a segment, and at most two
//! segments' worth is copied per segment of new data: writes stay under
//! three times what was stored, however large a long-deferred backlog
//! grows, and the copying outpaces the new dead data, so the disk holds
//! at most about three times the live data.
//!
//! The spool refuses new messages (`SpoolError::Full`) before the disk is
//! full: past `max_bytes` on disk, or when less than `reserve` would be
//! left free on the filesystem — room that updates, removals and the
//! copies that free space always have. A failed write or fsync cuts the
//! segment back to its last durable length and goes on in it.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::record::{self, DecodeError, Record};
use super::{Envelope, QueueId, RcptState, Recovered, Spool, SpoolError, SpoolFuture};

/// Sizes that bound the spool's files.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A segment is closed and a new one started once this many new bytes
    /// went into it.
    pub segment_bytes: u64,
    /// Dead bytes allowed before live messages are copied forward, in
    /// segments (beyond that, as many dead bytes as live ones): a message
    /// deferred for days must not pin every segment written after it.
    pub max_segments: usize,
    /// New messages are refused once the spool's files would exceed this.
    pub max_bytes: u64,
    /// New messages are refused unless this much would stay free on the
    /// filesystem.
    pub reserve: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_segments: 4,
            max_bytes: u64::MAX,
            reserve: 0,
        }
    }
}

impl Limits {
    /// The limits for a spool that may grow to `max_size` on a filesystem
    /// of `total` bytes.
    pub fn for_filesystem(total: u64, max_size: crate::config::SpoolSize) -> Limits {
        let defaults = Limits::default();
        let max_bytes = match max_size {
            crate::config::SpoolSize::Percent(p) => total / 100 * u64::from(p),
            crate::config::SpoolSize::Bytes(b) => b,
        };
        // Dead data is given back a segment at a time: segments must be
        // small next to the space the spool may use, or a small disk fills
        // with dead data in the open segment and stays full.
        let segment_bytes = defaults
            .segment_bytes
            .min(max_bytes / 8)
            .min(total / 16)
            .max(64 << 10);
        Limits {
            segment_bytes,
            max_bytes,
            // Room for updates, removals and compaction copies whatever
            // else fills the filesystem: a segment, or a twentieth of a
            // small filesystem.
            reserve: segment_bytes.min(total / 20),
            ..defaults
        }
    }
}

/// The size of the filesystem holding `dir` and the bytes free on it for
/// an unprivileged writer.
pub fn filesystem_space(dir: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs fills the struct it is given for a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * unit, st.f_bavail as u64 * unit))
}
/// What a message's record takes beside its body, at most in practice:
/// the envelope and framing (counted when a store is checked for room).
const ENVELOPE_ROOM: u64 = 4096;
/// Most bytes written in one batch; more waits for the next fsync.
const BATCH_LIMIT: usize = 16 << 20;
/// Contents of recently stored messages kept in memory, so that the usual
/// prompt delivery does not read them back from disk.
const CACHE_LIMIT: usize = 64 << 20;

enum Op {
    Store(Envelope, Bytes),
    Update(QueueId, Vec<(usize, RcptState)>),
    Remove(QueueId),
    Holders(QueueId, Vec<u64>),
    /// Writes nothing; answered when the writer reaches it.
    Probe,
}

struct Request {
    op: Op,
    done: Option<oneshot::Sender<Result<(), SpoolError>>>,
}

/// A live message: its envelope as it now stands, where its content is,
/// and which segments hold its records.
struct Location {
    envelope: Envelope,
    segment: u32,
    body_at: u64,
    body_len: usize,
    /// The size of its latest Store record: what a copy would write.
    record_len: u64,
    segments: Vec<u32>,
}

#[derive(Default)]
struct Index {
    messages: HashMap<QueueId, Location>,
    /// Live references per existing segment; every segment file is a key.
    refs: BTreeMap<u32, usize>,
    readers: HashMap<u32, Arc<File>>,
    /// The size of each segment file.
    sizes: BTreeMap<u32, u64>,
    /// Bytes of the live messages' latest Store records.
    live: u64,
}

impl Index {
    fn insert(&mut self, id: QueueId, loc: Location) {
        self.live += loc.record_len;
        if let Some(old) = self.messages.insert(id, loc) {
            self.live -= old.record_len;
        }
    }

    fn remove(&mut self, id: &QueueId) -> Option<Location> {
        let loc = self.messages.remove(id)?;
        self.live -= loc.record_len;
        Some(loc)
    }

    fn disk(&self) -> u64 {
        self.sizes.values().sum()
    }
}

#[derive(Default)]
struct Cache {
    bodies: HashMap<QueueId, Bytes>,
    bytes: usize,
}

struct Shared {
    dir: PathBuf,
    index: Mutex<Index>,
    cache: Mutex<Cache>,
    limits: Limits,
    /// Bytes in the spool's files, as of the last commit.
    disk: AtomicU64,
    /// Bytes ever appended since opening (records and copies).
    written: AtomicU64,
    /// Whether its size is the node's spool size metric (not for the
    /// spools that keep other nodes' shadow copies).
    report: bool,
}

/// The on-disk spool under `<data_dir>/spool`.
pub struct DiskSpool {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Request>,
    recovered: Vec<Recovered>,
}

impl Shared {
    /// Take the spool's size again.
    fn measure(&self) {
        let disk = self.index.lock().expect("index").disk();
        self.disk.store(disk, Ordering::Relaxed);
        if self.report {
            crate::metrics::spool_bytes(disk);
        }
    }

    /// Whether a new message of `len` bytes fits under the limits. The
    /// free space is asked of the kernel each time (a statvfs, about a
    /// microsecond): another file may fill or free the disk at any time.
    fn room_for(&self, len: u64) -> bool {
        let disk = self.disk.load(Ordering::Relaxed);
        if disk.saturating_add(len) > self.limits.max_bytes {
            return false;
        }
        if self.limits.reserve == 0 {
            return true;
        }
        match filesystem_space(&self.dir) {
            Ok((_, free)) => free >= len.saturating_add(self.limits.reserve),
            // Unknown: the write itself will tell.
            Err(_) => true,
        }
    }

    fn cache_insert(&self, id: QueueId, body: &Bytes) {
        let mut cache = self.cache.lock().expect("cache");
        if cache.bytes + body.len() <= CACHE_LIMIT {
            cache.bytes += body.len();
            if let Some(old) = cache.bodies.insert(id, body.clone()) {
                cache.bytes -= old.len();
            }
        }
    }

    fn cache_remove(&self, id: QueueId) {
        let mut cache = self.cache.lock().expect("cache");
        if let Some(old) = cache.bodies.remove(&id) {
            cache.bytes -= old.len();
        }
    }
}

fn segment_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

fn io_error(e: io::Error) -> SpoolError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        SpoolError::Full
    } else {
        SpoolError::Io(e)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl DiskSpool {
    /// Open (creating if needed) the spool in `dir` and recover its messages.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        Self::open_with(dir, Limits::default())
    }

    /// `open` with other file size limits (tests use tiny ones).
    pub fn open_with(dir: &Path, limits: Limits) -> Result<Self, SpoolError> {
        Self::open_as(dir, limits, true)
    }

    /// A spool of other nodes' shadow copies: its size is not this
    /// node's spool size metric.
    pub fn open_shadows(dir: &Path, limits: Limits) -> Result<Self, SpoolError> {
        Self::open_as(dir, limits, false)
    }

    fn open_as(dir: &Path, limits: Limits, report: bool) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir)?;
        let mut numbers: Vec<u32> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        numbers.sort_unstable();

        let mut live: HashMap<QueueId, Location> = HashMap::new();
        let mut index = Index::default();
        for &n in &numbers {
            let data = fs::read(segment_path(dir, n))?;
            replay(n, &data, &mut live);
            index.refs.insert(n, 0);
            index.sizes.insert(n, data.len() as u64);
        }
        let mut recovered = Vec::new();
        let mut finished = Vec::new();
        for (id, loc) in live {
            for s in &loc.segments {
                *index.refs.entry(*s).or_default() += 1;
            }
            if loc.envelope.is_finished() {
                finished.push(id);
            } else {
                recovered.push(Recovered {
                    envelope: loc.envelope.clone(),
                });
            }
            index.insert(id, loc);
        }
        recovered.sort_by_key(|r| r.envelope.id);

        let active = numbers.last().map_or(1, |n| n + 1);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            index: Mutex::new(index),
            cache: Mutex::new(Cache::default()),
            limits,
            disk: AtomicU64::new(0),
            written: AtomicU64::new(0),
            report,
        });
        delete_unreferenced(&shared, active);
        let file = open_segment(dir, active)?;
        {
            let mut index = shared.index.lock().expect("index");
            index.refs.insert(active, 0);
            index.sizes.insert(active, 0);
        }
        shared.measure();

        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            shared: shared.clone(),
            file: Some(file),
            active,
            len: 0,
            fresh: 0,
            buf: Vec::new(),
            limits,
        };
        std::thread::Builder::new()
            .name("mtad-spool".into())
            .spawn(move || writer.run(rx))?;

        // Messages whose recipients were all done but whose removal did not
        // make it to disk: finish them now so they do not pin segments.
        for id in finished {
            let _ = tx.send(Request {
                op: Op::Remove(id),
                done: None,
            });
        }
        Ok(Self {
            shared,
            tx,
            recovered,
        })
    }

    fn submit(&self, op: Op) -> SpoolFuture<'_, ()> {
        let (done, wait) = oneshot::channel();
        let sent = self.tx.send(Request {
            op,
            done: Some(done),
        });
        Box::pin(async move {
            sent.map_err(|_| SpoolError::Closed)?;
            wait.await.map_err(|_| SpoolError::Closed)?
        })
    }
}

/// Apply one segment's records to the live set; stop at the first record
/// that is torn or corrupt, since nothing after it was acknowledged.
fn replay(n: u32, data: &[u8], live: &mut HashMap<QueueId, Location>) {
    let mut at = 0;
    while at < data.len() {
        let (rec, size) = match record::decode(&data[at..]) {
            Ok(r) => r,
            Err(e) => {
                let what = match e {
                    DecodeError::Truncated => "torn tail",
                    DecodeError::Corrupt(why) => why,
                };
                tracing::warn!(
                    segment = n,
                    offset = at,
                    reason = what,
                    "spool segment ends early"
                );
                return;
            }
        };
        match rec {
            Record::Store {
                envelope,
                body_offset,
                body_len,
            } => {
                // A later Store of the same id (a compaction copy) replaces
                // the earlier one but keeps its segments referenced.
                let mut segments = live
                    .remove(&envelope.id)
                    .map(|l| l.segments)
                    .unwrap_or_default();
                if !segments.contains(&n) {
                    segments.push(n);
                }
                let loc = Location {
                    envelope,
                    segment: n,
                    body_at: (at + body_offset) as u64,
                    body_len,
                    record_len: size as u64,
                    segments,
                };
                live.insert(loc.envelope.id, loc);
            }
            Record::Update { id, changes } => {
                if let Some(loc) = live.get_mut(&id) {
                    apply(&mut loc.envelope, &changes);
                    if !loc.segments.contains(&n) {
                        loc.segments.push(n);
                    }
                }
            }
            Record::Holders { id, holders } => {
                if let Some(loc) = live.get_mut(&id) {
                    loc.envelope.holders = holders;
                    if !loc.segments.contains(&n) {
                        loc.segments.push(n);
                    }
                }
            }
            Record::Remove { id } => {
                live.remove(&id);
            }
        }
        at += size;
    }
}

fn apply(env: &mut Envelope, changes: &[(usize, RcptState)]) {
    for (i, state) in changes {
        if let Some(r) = env.recipients.get_mut(*i) {
            r.state = state.clone();
        }
    }
}

fn open_segment(dir: &Path, n: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(segment_path(dir, n))?;
    // The new file's directory entry must be durable before anything in
    // it is acknowledged.
    sync_dir(dir)?;
    Ok(file)
}

/// Delete segments from the oldest end while nothing live refers to them.
fn delete_unreferenced(shared: &Shared, active: u32) {
    let mut index = shared.index.lock().expect("index");
    while let Some((&n, &refs)) = index.refs.iter().next() {
        if refs > 0 || n >= active {
            break;
        }
        index.refs.remove(&n);
        index.readers.remove(&n);
        index.sizes.remove(&n);
        if let Err(e) = fs::remove_file(segment_path(&shared.dir, n)) {
            tracing::warn!(segment = n, error = %e, "could not delete spool segment");
        }
    }
}

impl DiskSpool {
    /// Bytes in the spool's files now (as of the last commit).
    pub fn bytes_on_disk(&self) -> u64 {
        self.shared.disk.load(Ordering::Relaxed)
    }

    /// Bytes appended since opening: records and compaction copies.
    pub fn bytes_written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }
}

impl Spool for DiskSpool {
    fn store(&self, envelope: Envelope, body: Bytes) -> SpoolFuture<'_, ()> {
        // Refused before the disk is full, not by it: updates, removals
        // and compaction copies keep their room.
        if !self.shared.room_for(body.len() as u64 + ENVELOPE_ROOM) {
            return Box::pin(async { Err(SpoolError::Full) });
        }
        let id = envelope.id;
        self.shared.cache_insert(id, &body);
        let stored = self.submit(Op::Store(envelope, body));
        Box::pin(async move {
            let r = stored.await;
            if r.is_err() {
                // Not durable, so not a message: forget its content too.
                self.shared.cache_remove(id);
            }
            r
        })
    }

    fn update(&self, id: QueueId, changes: Vec<(usize, RcptState)>) -> SpoolFuture<'_, ()> {
        self.submit(Op::Update(id, changes))
    }

    fn remove(&self, id: QueueId) -> SpoolFuture<'_, ()> {
        self.shared.cache_remove(id);
        self.submit(Op::Remove(id))
    }

    fn set_holders(&self, id: QueueId, holders: Vec<u64>) -> SpoolFuture<'_, ()> {
        self.submit(Op::Holders(id, holders))
    }

    fn body(&self, id: QueueId) -> SpoolFuture<'_, Bytes> {
        let cached = self
            .shared
            .cache
            .lock()
            .expect("cache")
            .bodies
            .get(&id)
            .cloned();
        let shared = self.shared.clone();
        Box::pin(async move {
            if let Some(b) = cached {
                return Ok(b);
            }
            tokio::task::spawn_blocking(move || read_body(&shared, id))
                .await
                .map_err(|e| SpoolError::Io(io::Error::other(e)))?
        })
    }

    fn probe(&self) -> SpoolFuture<'_, ()> {
        self.submit(Op::Probe)
    }

    fn recovered(&self) -> Vec<Recovered> {
        self.recovered.clone()
    }
}

fn read_body(shared: &Shared, id: QueueId) -> Result<Bytes, SpoolError> {
    // Location and file handle under one lock: compaction may move the
    // message and unlink its old segment at any moment after, and an open
    // handle still reads an unlinked file.
    let (file, at, len) = {
        let mut index = shared.index.lock().expect("index");
        let loc = index.messages.get(&id).ok_or(SpoolError::NotFound(id))?;
        let (seg, at, len) = (loc.segment, loc.body_at, loc.body_len);
        (reader(shared, &mut index, seg)?, at, len)
    };
    read_exact(&file, at, len)
}

fn read_at(shared: &Shared, seg: u32, at: u64, len: usize) -> Result<Bytes, SpoolError> {
    let file = reader(shared, &mut shared.index.lock().expect("index"), seg)?;
    read_exact(&file, at, len)
}

fn reader(shared: &Shared, index: &mut Index, seg: u32) -> io::Result<Arc<File>> {
    if let Some(f) = index.readers.get(&seg) {
        return Ok(f.clone());
    }
    let f = Arc::new(File::open(segment_path(&shared.dir, seg))?);
    index.readers.insert(seg, f.clone());
    Ok(f)
}

fn read_exact(file: &File, at: u64, len: usize) -> Result<Bytes, SpoolError> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, at)?;
    Ok(Bytes::from(buf))
}

#[path = "disk_writer.rs"]
mod writer;
use writer::Writer;

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;
