//! The only module that names sled: key layout, atomic document writes, indexes, counters and
//! the durability contract.
//!
//! Everything lives in sled's default tree under one-byte prefixes. A document write touches
//! several of them, atomically: a large one (a page of a sync) as one `apply_batch`, a small
//! one (an API write) as plain inserts behind a redo record (see `Store::apply`):
//!
//! | key | value |
//! |---|---|
//! | `M` name | node metadata: HLC high-water mark, counters, open marker, sequence floor, live bytes at the last rewrite check, the redo record of a small write under way |
//! | `H` doc id | [`DocMeta`]: kind, tracker, heads, change seq, chunk bookkeeping |
//! | `S` doc id | snapshot: a new document's change (`save_after(&[])`), or compacted (`save()`) |
//! | `C` doc id, chunk u32 BE | one incremental change chunk (`save_after(heads)`) |
//! | `Q` seq u64 BE | doc id, source u64 BE (absent in entries written before 2026-11-25): the changes feed, one live entry per document at its latest seq (an older entry, stale, is skipped by readers and removed by the flusher) |
//! | `T` tracker id | (empty) list of trackers |
//! | `N` tracker name | tracker id |
//! | `I` tracker id, item id | deleted flag (1 byte): items of a tracker in id (time) order |
//! | `D` display id | item id |
//! | `K` peer id (bytes) | checkpoint on that peer's feed: its incarnation (16 B), seq u64 BE |
//! | `P` peer id (text) | peer configuration (JSON) |
//! | `V` peer id (bytes) | that peer's known position on our feed: incarnation (16 B), seq |
//! | `W` peer id (bytes) | where the last page served to that peer ended: incarnation (16 B), seq |
//!
//! Snapshot and chunks are separate keys so a torn or corrupt chunk never costs the snapshot.
//!
//! Durability: [`Store::commit`] applies a write and returns a ticket; [`Store::wait_durable`]
//! returns once a flush that started after the write was applied has finished. A flusher
//! thread makes the flushes (group commit, see `Durable`): one fsync covers every write
//! applied before it began. All calls block (async callers use `spawn_blocking`), except
//! [`Store::flush_done`], which lets a writer wait for its flush as a task.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::hlc::Hlc;

mod rewrite;

/// Longest the flusher waits for other writes under way to apply, so one fsync covers them
/// too (PostgreSQL's `commit_delay`). A lone writer is not kept waiting. Under 8 API clients
/// a group of 6 writes per fsync instead of 2 (300 µs) paid for the wait: each fsync costs
/// sled a thread-pool hand-off that wakes all seven of its I/O threads.
const GROUP_COMMIT_WAIT: Duration = Duration::from_millis(1);

thread_local! {
    /// Write registrations held by this thread ([`Store::begin_write`]). While the thread
    /// settles they do not count as writes under way: a write waiting for a flush, or leading
    /// one, has nothing left to apply.
    static OWN_WRITES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// sled's page cache by default. Documents are cached decoded by the repo; this only needs the
/// hot pages.
const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

fn sled_config(path: &Path, cache_bytes: u64) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        // Measured on this workload: less CPU and less disk per write than LowSpace.
        .mode(sled::Mode::HighThroughput)
        // Writes are made durable on demand (see `Durable`), but sled 0.34 cleans its log's
        // segments (moves the live pages out of mostly dead ones so they can be reused) only
        // in this timer's thread, after each of its flushes. Without it the file grew to 4-8
        // times the live data under steady small writes (see ARCHITECTURE.md, Disk).
        .flush_every_ms(Some(SLED_TIMER_MS))
}

/// How often sled's own thread flushes and cleans segments (see [`sled_config`]). Measured in
/// 6-minute soaks (3 nodes, one seed), disk per node at the end: no timer 73-149 MB, 1000 ms
/// 76-133 MB, 500 ms 18-89 MB, 200 ms 13-17 MB; API writes, sync and catch-up unchanged.
const SLED_TIMER_MS: u64 = 200;

/// How long an open waits for sled's file lock (see [`open_sled`]).
const LOCK_WAIT: Duration = Duration::from_secs(3);
/// Stale feed entries the flusher removes at a time (see [`Durable::sweep`]): a write that
/// comes in meanwhile waits for at most these (cold, about 20 µs each after a restart).
const SWEEP_STEP: usize = 16;
/// Stale feed entries left for the flusher's idle time; past these it removes a step after
/// every flush too.
const STALE_BACKLOG: usize = 4096;
/// Stale feed entries noted at most; more wait for a reader to pass over them.
const STALE_MAX: usize = 1 << 18;
/// Stale feed entries removed at most on a clean stop; the rest wait as after a crash.
const SWEEP_AT_STOP: usize = 50_000;

/// Open sled, waiting a little for its file lock. Dropping a `sled::Db` releases the lock
/// only when sled's background threads let go of their last reference to the log, which
/// may be moments later: a reopen in the same process (the checkpoint at a clean stop, a
/// restart in tests) can find it still held. Another process holding the store still gets
/// sled's "could not acquire lock" error, after `LOCK_WAIT`.
fn open_sled(path: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match sled_config(path, cache_bytes).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

const P_DOCMETA: u8 = b'H';
const P_SNAPSHOT: u8 = b'S';
const P_CHUNK: u8 = b'C';
const P_SEQ: u8 = b'Q';
const P_TRACKER: u8 = b'T';
const P_TRACKER_NAME: u8 = b'N';
const P_ITEM_INDEX: u8 = b'I';
const P_DISPLAY: u8 = b'D';
const P_CHECKPOINT: u8 = b'K';
const P_PEER: u8 = b'P';
/// Sync log entries (JSON) by a counter; the oldest are dropped past `LOG_MAX_ENTRIES`.
const P_LOG: u8 = b'L';
/// When a peer's scheduled sync last ran (ms since the epoch), by peer.
const P_LAST_RUN: u8 = b'R';
/// Losing values a user has reviewed (the conflict inbox's acknowledgements), by item:
/// a JSON array of [field, loser stamp]. Local to this node; never synced.
const P_ACK: u8 = b'A';
/// What a peer is known to hold of our feed (from its pulls and its bundles), by peer: the
/// incarnation we present to it (16 B) and seq u64 BE. Where `export --for-peer` starts.
const P_PEER_HAS: u8 = b'V';
/// Where the last page we served a peer ended on our feed, by peer: the incarnation we
/// present to it (16 B) and seq u64 BE. Only for counting what the peer still lacks: `V`
/// (where its last pull started) would count that page again, a cold metadata read per
/// document, and after a restart that delayed the first status (see `Store::peer_served`).
const P_SERVED: u8 = b'W';

/// Sync log entries kept (the log rotates).
pub const LOG_MAX_ENTRIES: u64 = 10_000;

/// This store's incarnation: random, made when the store is created. Peers key their
/// checkpoints on it, so a wiped or restored store makes them start over (CouchDB's
/// replication id does the same with the server UUID).
const META_INCARNATION: &[u8] = b"Mincarnation";

/// Counters and the clock high-water mark, in one key so a write updates one record:
/// version u8, live items u64, trackers u64, display counter u64, HLC (28 bytes).
const META_STATE: &[u8] = b"Mstate";

/// Present while the store is open (written durably at open, removed by
/// [`Store::flush_for_stop`] on a clean stop). Found at open, it says the last run ended without a clean stop.
const META_OPEN: &[u8] = b"Mopen";

/// The lowest sequence number the next change may take (u64 BE): where numbering resumed after
/// the last gap (see [`SEQ_AHEAD`]). Absent until the first gap.
const META_SEQ_FLOOR: &[u8] = b"Mseqfloor";

/// A small document write's keys and values (less those no reader sees yet), written before
/// them and removed after them (see [`Store::apply`]); found at open, the write is finished
/// from it.
const META_REDO: &[u8] = b"Mredo";

/// Writes of at most this many bytes (keys and values) go through the redo record instead of
/// `apply_batch`.
const SMALL_WRITE_BYTES: usize = 32 * 1024;

/// How far past the last durable change a live push may reach (see [`Store::feed_recent`]).
/// After a run that ended without a clean stop, sequence numbers resume this far past the last
/// one found on disk (or the last floor), so none a peer may have been pushed before the crash
/// is reused; the new floor is durable before the store takes writes.
const SEQ_AHEAD: u64 = 1 << 16;
const STATE_LEN: usize = 1 + 8 + 8 + 8 + crate::hlc::HLC_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error(
        "storage is unavailable: the last flush failed ({0}); writes are refused until there is room again (the node reopens its store by itself then); reads still work"
    )]
    FlushFailed(String),
    #[error(
        "storage is unavailable: a write failed ({0}); writes are refused until there is room again (the node reopens its store by itself then); reads still work"
    )]
    WriteFailed(String),
    #[error("corrupt record under key {key}: {what}")]
    Corrupt { key: String, what: &'static str },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocKind {
    Tracker,
    Item,
}

/// Bookkeeping for one document, kept outside the document so indexes and sync never need to
/// decode Automerge.
#[derive(Clone, Debug, PartialEq)]
pub struct DocMeta {
    pub kind: DocKind,
    /// The item's tracker; a tracker's own id for trackers.
    pub tracker: Uuid,
    /// Local change sequence number of the latest write.
    pub seq: u64,
    /// Automerge heads after the latest write.
    pub heads: Vec<[u8; 32]>,
    /// Incremental chunks stored after the snapshot.
    pub chunks: u32,
    pub deleted: bool,
    /// The peer (a hash of its PeerId, see [`peer_tag`]) this state was received from, when
    /// our heads equal that peer's; 0 after a local write. Serving that peer's pull skips the
    /// document: it already has exactly this.
    pub source: u64,
    /// Local change sequence number at which the snapshot was written (creation or the last
    /// compaction); 0 when unknown (records written before it was kept). A reader holding
    /// the document as of an earlier number lacks some of what the snapshot folded in.
    pub snapshot_seq: u64,
}

/// A document's state in 16 bytes: BLAKE3 over its id and its heads in sorted order, so two
/// nodes holding the same state of a document compute the same digest.
pub fn doc_digest(id: Uuid, heads: &[[u8; 32]]) -> u128 {
    let mut sorted = heads.to_vec();
    sorted.sort_unstable();
    let mut h = blake3::Hasher::new();
    h.update(id.as_bytes());
    for head in &sorted {
        h.update(head);
    }
    let out = h.finalize();
    u128::from_le_bytes(out.as_bytes()[..16].try_into().expect("16 bytes"))
}

/// A stable 64-bit tag for a peer, for [`DocMeta::source`]. Never 0.
pub fn peer_tag(peer: &[u8]) -> u64 {
    // FNV-1a: stable across runs and builds, which std's hasher is not.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in peer {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

impl DocMeta {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 32 * self.heads.len());
        out.push(1); // format version
        out.push(match self.kind {
            DocKind::Tracker => 0,
            DocKind::Item => 1,
        });
        out.extend_from_slice(self.tracker.as_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.chunks.to_be_bytes());
        out.push(self.deleted as u8);
        out.extend_from_slice(&(self.heads.len() as u16).to_be_bytes());
        for h in &self.heads {
            out.extend_from_slice(h);
        }
        out.extend_from_slice(&self.source.to_be_bytes());
        out.extend_from_slice(&self.snapshot_seq.to_be_bytes());
        out
    }

    fn decode(b: &[u8]) -> Option<DocMeta> {
        if b.len() < 33 || b[0] != 1 {
            return None;
        }
        let kind = match b[1] {
            0 => DocKind::Tracker,
            1 => DocKind::Item,
            _ => return None,
        };
        let tracker = Uuid::from_bytes(b[2..18].try_into().ok()?);
        let seq = u64::from_be_bytes(b[18..26].try_into().ok()?);
        let chunks = u32::from_be_bytes(b[26..30].try_into().ok()?);
        let deleted = b[30] != 0;
        let n = u16::from_be_bytes(b[31..33].try_into().ok()?) as usize;
        let rest = &b[33..];
        // Records written before `snapshot_seq` was kept end with the source.
        let (rest, snapshot_seq) = match rest.len().checked_sub(n * 32) {
            Some(8) => (rest, 0),
            Some(16) => {
                let (rest, at) = rest.split_at(rest.len() - 8);
                (rest, u64::from_be_bytes(at.try_into().ok()?))
            }
            _ => return None,
        };
        let (rest, source) = rest.split_at(n * 32);
        let source = u64::from_be_bytes(source.try_into().ok()?);
        let heads = rest
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32-byte chunk"))
            .collect();
        Some(DocMeta {
            kind,
            tracker,
            seq,
            heads,
            chunks,
            deleted,
            source,
            snapshot_seq,
        })
    }
}

/// What to write for a document.
#[cfg_attr(test, derive(Clone))]
pub enum DocData {
    /// Replace the snapshot and drop every chunk (creation and compaction).
    Snapshot(Vec<u8>),
    /// Append one incremental chunk.
    Chunk(Vec<u8>),
}

#[cfg_attr(test, derive(Clone))]
pub struct DocWrite {
    pub id: Uuid,
    pub kind: DocKind,
    pub tracker: Uuid,
    pub deleted: bool,
    pub heads: Vec<[u8; 32]>,
    pub data: DocData,
    /// A new item's display id, to index.
    pub display_id: Option<String>,
    /// A new tracker's name, to index.
    pub tracker_name: Option<String>,
    /// Highest stamp the node has issued or seen; persisted so the clock survives restarts.
    pub hlc: Hlc,
    /// See [`DocMeta::source`].
    pub source: u64,
    /// For a compaction (`data` a snapshot of a document stored before): the changes since its
    /// previous write. What [`Store::feed_recent`] hands a live push instead of the snapshot,
    /// so the receiver merges one change rather than loading the whole document.
    pub increment: Option<Vec<u8>>,
}

/// Stored bytes of one document.
pub struct DocBytes {
    pub meta: DocMeta,
    pub snapshot: Vec<u8>,
    pub chunks: Vec<Vec<u8>>,
    /// The change sequence number each chunk was written at (0 if unknown).
    pub chunk_seqs: Vec<u64>,
}

/// Format tag of a stored chunk: tag, sequence number (u64 BE), Automerge bytes. A value
/// without the tag (it would start with Automerge's magic bytes) is an untagged chunk.
const CHUNK_V1: u8 = 1;

fn decode_chunk(v: &[u8]) -> (u64, &[u8]) {
    match v.split_first() {
        Some((&CHUNK_V1, rest)) if rest.len() >= 8 => (
            u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
            &rest[8..],
        ),
        _ => (0, v),
    }
}

/// One past the highest counter keyed under `prefix` (a u64 BE after the prefix byte); 1 when
/// there is none.
/// Finish a small commit that a crash interrupted (see [`Store::apply`]): apply its writes
/// from the redo record, with the record's removal, as one batch, and make that durable.
fn redo(db: &sled::Db) -> Result<()> {
    let Some(record) = db.get(META_REDO)? else {
        return Ok(());
    };
    let ops = Ops::decode(&record).ok_or(StoreError::Corrupt {
        key: "Mredo".into(),
        what: "redo record of an unfinished write",
    })?;
    let mut batch = ops.to_batch();
    batch.remove(META_REDO);
    db.apply_batch(batch)?;
    db.flush()?;
    tracing::info!(
        writes = ops.writes.len(),
        "finished a write the last run left half applied"
    );
    Ok(())
}

fn next_counter(db: &sled::Db, prefix: u8, what: &'static str) -> Result<u64> {
    match db.scan_prefix([prefix]).next_back() {
        None => Ok(1),
        Some(kv) => {
            let (k, _) = kv?;
            let n: [u8; 8] = k[1..].try_into().map_err(|_| StoreError::Corrupt {
                key: (prefix as char).to_string(),
                what,
            })?;
            Ok(u64::from_be_bytes(n) + 1)
        }
    }
}

/// (incarnation, seq) as stored under `K` and `V`.
fn decode_position(v: &[u8]) -> Option<(Uuid, u64)> {
    (v.len() == 24).then(|| {
        (
            Uuid::from_bytes(v[..16].try_into().expect("16 bytes")),
            u64::from_be_bytes(v[16..24].try_into().expect("8 bytes")),
        )
    })
}

/// Proof that a batch was applied; pass it to [`Store::wait_durable`].
#[derive(Clone, Copy, Debug)]
pub struct Ticket(u64);

/// The changes written last, as the feed would offer them, so a live push reads them from
/// memory instead of sled. Holds every sequence number in (`floor`, last assigned], each
/// with its bytes (`true`) or, from a large batch, its metadata only (`false`).
struct Recent {
    entries: std::collections::VecDeque<(FeedEntry, bool)>,
    bytes: usize,
    floor: u64,
}

/// See [`Store::feed_count_since`].
const FEED_COUNT_LOOK: u64 = 10;

/// What [`Recent`] keeps, at most.
const RECENT_ENTRIES: usize = 4096;
const RECENT_BYTES: usize = 1 << 20;
/// The bytes of a batch larger than this (an initial sync's page) are not copied into
/// [`Recent`], only its metadata: live pushes are one or a few changes, and for a page
/// received from a peer the metadata is enough to tell that pushing it back to that peer
/// would carry nothing.
const RECENT_BATCH: usize = 64;

impl Recent {
    fn add(&mut self, entry: FeedEntry, with_data: bool) {
        self.bytes += entry.data.len();
        self.entries.push_back((entry, with_data));
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            let Some((old, _)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.data.len();
            self.floor = old.seq;
        }
    }
}

/// Counters kept under the commit lock.
struct CommitState {
    next_seq: u64,
    live_items: u64,
    trackers: u64,
    /// Highest display number persisted.
    display: u64,
    hlc: Hlc,
}

impl CommitState {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATE_LEN);
        out.push(1);
        out.extend_from_slice(&self.live_items.to_be_bytes());
        out.extend_from_slice(&self.trackers.to_be_bytes());
        out.extend_from_slice(&self.display.to_be_bytes());
        out.extend_from_slice(&self.hlc.to_bytes());
        out
    }

    /// (live items, trackers, display, hlc)
    fn decode(b: &[u8]) -> Option<(u64, u64, u64, Hlc)> {
        if b.len() != STATE_LEN || b[0] != 1 {
            return None;
        }
        let n = |at: usize| b[at..at + 8].try_into().ok().map(u64::from_be_bytes);
        Some((n(1)?, n(9)?, n(17)?, Hlc::from_bytes(&b[25..])?))
    }
}

/// A commit's writes: applied as one sled batch, or one by one behind a redo record (see
/// [`Store::apply`]).
#[derive(Debug, Default, PartialEq)]
struct Ops {
    /// Inserts of keys that no reader looks at until metadata written later in the commit
    /// points to them: a new document's snapshot, a chunk past a document's chunk count.
    /// Written before the redo record and left out of it: a crash that cuts the commit
    /// before the record leaves them unread, and the next write reuses the chunk's key.
    unseen: Vec<(Vec<u8>, Vec<u8>)>,
    /// Every other write, in order.
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Ops {
    fn insert(&mut self, k: Vec<u8>, v: impl Into<Vec<u8>>) {
        self.writes.push((k, Some(v.into())));
    }

    fn insert_unseen(&mut self, k: Vec<u8>, v: impl Into<Vec<u8>>) {
        self.unseen.push((k, v.into()));
    }

    fn remove(&mut self, k: Vec<u8>) {
        self.writes.push((k, None));
    }

    /// Keys and values, in bytes.
    fn bytes(&self) -> usize {
        let unseen: usize = self.unseen.iter().map(|(k, v)| k.len() + v.len()).sum();
        unseen + self.writes_bytes()
    }

    /// Keys and values of `writes` (what the redo record holds), in bytes.
    fn writes_bytes(&self) -> usize {
        self.writes
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum()
    }

    /// The same writes as one sled batch (in which the last write to a key wins, as applying
    /// them in order would leave it).
    fn to_batch(&self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (k, v) in &self.unseen {
            batch.insert(k.as_slice(), v.as_slice());
        }
        for (k, v) in &self.writes {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                None => batch.remove(k.as_slice()),
            }
        }
        batch
    }

    /// The redo record of `writes` (not `unseen`): version 1, the number of writes u32 BE,
    /// then per write 1 (insert) or 0 (remove), key length u32 BE, key, and for an insert
    /// value length u32 BE, value.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.writes_bytes() + 9 * self.writes.len());
        out.push(1);
        out.extend_from_slice(&(self.writes.len() as u32).to_be_bytes());
        for (k, v) in &self.writes {
            out.push(v.is_some() as u8);
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k);
            if let Some(v) = v {
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
        out
    }

    fn decode(b: &[u8]) -> Option<Ops> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = b.split_at_checked(n)?;
            *b = rest;
            Some(head)
        }
        fn sized<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
            let n = u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize;
            take(b, n)
        }
        let mut b = b;
        if take(&mut b, 1)? != [1] {
            return None;
        }
        let n = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?);
        let mut ops = Ops::default();
        for _ in 0..n {
            let insert = match take(&mut b, 1)?[0] {
                0 => false,
                1 => true,
                _ => return None,
            };
            let k = sized(&mut b)?.to_vec();
            let v = if insert {
                Some(sized(&mut b)?.to_vec())
            } else {
                None
            };
            ops.writes.push((k, v));
        }
        b.is_empty().then_some(ops)
    }
}

struct FlushState {
    /// Every ticket up to this one is durable.
    flushed: u64,
    /// Every change sequence number up to this one is durable.
    durable_seq: u64,
    /// The highest ticket a writer waits for.
    wanted: u64,
    in_progress: bool,
    /// The last flush's error, and the highest ticket wanted when it began.
    last_error: Option<(String, u64)>,
    /// The store is closing: the flusher ends once nothing is wanted.
    stop: bool,
}

/// Group commit: the flusher thread ([`Durable::run`]) and what writers share with it.
///
/// A writer applies its batch, marks the ticket it waits for as wanted, and waits (on a
/// blocking thread, or as a task with [`Store::flush_done`]). The flusher waits until a
/// ticket is wanted, then up to [`GROUP_COMMIT_WAIT`] for the other writes under way to
/// apply, flushes once for all of them, and starts over. Writers never flush themselves: a
/// blocking thread holding a flush (and its wait for the group) is one that no write can use
/// to apply, and the blocking pool is small (`BLOCKING_THREADS` in `main.rs`).
struct Durable {
    db: sled::Db,
    /// sled's log file (`db` in the store directory), for `fdatasync`.
    log_file: std::fs::File,
    state: Mutex<FlushState>,
    /// Signalled when a flush ends.
    flushed_cv: Condvar,
    /// The flushed ticket, sent after every flush (and failed flush) for waiters without a
    /// thread ([`Store::flush_done`]).
    flushed_tx: tokio::sync::watch::Sender<u64>,
    /// Wakes the flusher: a ticket wanted, a write applied or given up, the store closing.
    wake_cv: Condvar,
    /// Writes between [`Store::begin_write`] (or [`Store::announce_write`]) and the end of
    /// their durability wait, less those of threads settling now.
    writers: AtomicUsize,
    /// Highest ticket handed out.
    applied: AtomicU64,
    /// The change sequence number of the last batch applied.
    applied_seq: AtomicU64,
    /// How long the flusher waits for writes under way, in µs ([`GROUP_COMMIT_WAIT`]; tests
    /// set it).
    group_wait_us: AtomicU64,
    flushes: AtomicU64,
    /// A flush failed with an I/O error. sled 0.34 keeps failing after one (its error is
    /// sticky) until the store is reopened.
    io_failed: std::sync::atomic::AtomicBool,
    /// Feed entries (by sequence number) of documents written again since, which the
    /// flusher removes between flushes (see [`Durable::sweep`]).
    stale: Mutex<BTreeSet<u64>>,
}

impl Durable {
    /// Make everything applied so far durable. sled 0.34 writes its log with
    /// `sync_file_range` on Linux, which neither flushes the device's write cache nor
    /// persists the file's size: an `fdatasync` of the log file after it does.
    fn sync(&self) -> sled::Result<()> {
        self.db.flush()?;
        self.log_file.sync_data()?;
        Ok(())
    }

    /// Wake the flusher. The state lock is taken first so the wake-up cannot fall between
    /// the flusher's check and its wait (it would then sit out its wait for nothing).
    fn wake(&self) {
        drop(self.state.lock().expect("flush lock"));
        self.wake_cv.notify_all();
    }

    /// Note feed entries as stale: their documents have been written again since, under a
    /// higher sequence number. Past [`STALE_MAX`] noted and not yet removed, more are not
    /// noted; a feed reader that passes over them notes them again.
    fn note_stale(&self, seqs: impl IntoIterator<Item = u64>) {
        let mut stale = self.stale.lock().expect("stale lock");
        for s in seqs {
            if stale.len() >= STALE_MAX {
                break;
            }
            stale.insert(s);
        }
    }

    fn stale_count(&self) -> usize {
        self.stale.lock().expect("stale lock").len()
    }

    /// Remove up to `max` stale feed entries, lowest first.
    ///
    /// A write used to remove its document's old feed entry itself. After a restart that is
    /// a read of a cold leaf per document, in the commit that every other writer waits for:
    /// a fifth of a catch-up's time. Readers skip a stale entry anyway (its document's
    /// metadata has moved past it, see [`Store::feed_doc`]), so the removal can wait. A
    /// sequence number is never reused, so an entry once stale stays stale, and removing it
    /// needs no lock. One left behind by a crash is noted again by the next reader that
    /// passes over it.
    fn sweep(&self, max: usize) {
        let batch: Vec<u64> = {
            let mut stale = self.stale.lock().expect("stale lock");
            std::iter::from_fn(|| stale.pop_first()).take(max).collect()
        };
        for seq in &batch {
            if let Err(e) = self.db.remove(key(P_SEQ, &[&seq.to_be_bytes()])) {
                // The write path reports a failing store; the entries stay, skipped by
                // readers, and are noted again when one passes over them.
                tracing::debug!(error = %e, "cannot remove stale feed entries; left for later");
                self.stale.lock().expect("stale lock").clear();
                return;
            }
        }
    }

    /// The flusher thread's loop; returns when the store closes.
    fn run(&self) {
        // Something to flush: a ticket wanted and not yet flushed, other than those the last
        // (failed) flush was for. A writer asking again after that makes it try again.
        let due = |st: &FlushState| {
            st.wanted > st.flushed && st.last_error.as_ref().is_none_or(|e| st.wanted > e.1)
        };
        let mut st = self.state.lock().expect("flush lock");
        loop {
            while !due(&st) && !st.stop {
                // Idle, with no write under way: remove stale feed entries a few at a time,
                // so a write that comes in meanwhile waits for at most one step. (A writer
                // ending wakes this thread.)
                if self.writers.load(Ordering::SeqCst) == 0 && self.stale_count() > 0 {
                    drop(st);
                    self.sweep(SWEEP_STEP);
                    st = self.state.lock().expect("flush lock");
                    continue;
                }
                st = self.wake_cv.wait(st).expect("flush lock");
            }
            if !due(&st) {
                return;
            }
            st.in_progress = true;
            // Let writers already under way apply first, so this flush covers them too.
            let wait = Duration::from_micros(self.group_wait_us.load(Ordering::Relaxed));
            let deadline = Instant::now() + wait;
            loop {
                let now = Instant::now();
                if self.writers.load(Ordering::SeqCst) == 0 || now >= deadline {
                    break;
                }
                st = self
                    .wake_cv
                    .wait_timeout(st, deadline - now)
                    .expect("flush lock")
                    .0;
            }
            let wanted = st.wanted;
            drop(st);
            // Every ticket handed out so far belongs to a batch already applied, and so does
            // the sequence number read after it: the flush covers both.
            let target = self.applied.load(Ordering::SeqCst);
            let seq = self.applied_seq.load(Ordering::SeqCst);
            let result = self.sync();
            self.flushes.fetch_add(1, Ordering::Relaxed);
            st = self.state.lock().expect("flush lock");
            st.in_progress = false;
            match result {
                Ok(_) => {
                    st.flushed = st.flushed.max(target);
                    st.durable_seq = st.durable_seq.max(seq);
                    st.last_error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "store flush failed");
                    self.io_failed.store(true, Ordering::SeqCst);
                    st.last_error = Some((e.to_string(), wanted));
                }
            }
            self.flushed_cv.notify_all();
            self.flushed_tx.send_replace(st.flushed);
            // Under a steady stream of writes the flusher is never idle: a step after each
            // flush keeps the stale entries from piling up past a backlog.
            if self.stale_count() > STALE_BACKLOG {
                drop(st);
                self.sweep(SWEEP_STEP);
                st = self.state.lock().expect("flush lock");
            }
        }
    }
}

/// One document as the change feed offers it to a peer.
#[derive(Clone)]
pub struct FeedEntry {
    pub seq: u64,
    pub id: Uuid,
    pub meta: DocMeta,
    /// The increments since the last compaction, or the snapshot when there are none.
    pub data: Vec<u8>,
}

pub struct Store {
    db: sled::Db,
    path: std::path::PathBuf,
    /// sled's page cache size, kept for the checkpoint's reopen.
    cache_bytes: u64,
    incarnation: Uuid,
    commit: Mutex<CommitState>,
    durable: std::sync::Arc<Durable>,
    /// The flusher thread, ended and joined when the store is dropped.
    flusher: Option<std::thread::JoinHandle<()>>,
    display_next: AtomicU64,
    /// Next sync log entry number.
    log_next: AtomicU64,
    /// Document digests by id, for set reconciliation; built on first use, then kept current
    /// by every commit.
    digests: Mutex<Option<BTreeMap<Uuid, u128>>>,
    /// The last changes written (see [`Store::feed_recent`]); appended under the commit lock.
    recent: Mutex<Recent>,
    /// Held for writing while a small commit applies its inserts, for reading by readers of
    /// more than one of a document's keys (see [`Store::apply`]).
    view: std::sync::RwLock<()>,
    /// Apply every commit with `apply_batch` (tests compare the two ways).
    #[cfg(test)]
    batch_only: bool,
    /// Stop a small commit after this many of its steps (unseen inserts, redo record,
    /// writes, the record's removal), as a crash would (tests).
    #[cfg(test)]
    torn_after: Option<usize>,
}

/// Whether the feed leaves a document out for a reader: the reader (tagged `skip_source`)
/// sent us exactly this state, or its tracker is outside the share policy `shared`.
fn left_out(
    meta: &DocMeta,
    skip_source: u64,
    shared: Option<&std::collections::HashSet<Uuid>>,
) -> bool {
    (skip_source != 0 && meta.source == skip_source)
        || shared.is_some_and(|t| !t.contains(&meta.tracker))
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(prefix);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_with_cache(path, SLED_CACHE_BYTES)
    }

    /// Open with a page cache of `cache_bytes` (sled's own accounting; it may overshoot).
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Store> {
        rewrite::recover(path)?;
        let db = open_sled(path, cache_bytes)?;
        redo(&db)?;
        // sled's log file, to fdatasync after sled's own flush (see `Store::sync`).
        let log_file = std::fs::File::open(path.join("db"))
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        let floor = match db.get(META_SEQ_FLOOR)? {
            None => 0,
            Some(v) => {
                u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: "Mseqfloor".into(),
                    what: "sequence floor",
                })?)
            }
        };
        let mut next_seq = next_counter(&db, P_SEQ, "sequence key is not 8 bytes")?.max(floor);
        let unclean = db.get(META_OPEN)?.is_some();
        if unclean {
            // Changes applied but not yet durable when the last run ended may have been
            // pushed to peers under numbers the log no longer holds: never reuse them.
            next_seq += SEQ_AHEAD;
            tracing::info!(
                next_seq,
                "the last run ended without a clean stop; change numbers resume past a gap"
            );
        }
        let (live_items, trackers, display, hlc) = match db.get(META_STATE)? {
            None => (0, 0, 0, Hlc::default()),
            Some(v) => CommitState::decode(&v).ok_or(StoreError::Corrupt {
                key: "Mstate".into(),
                what: "node state record",
            })?,
        };
        let state = CommitState {
            next_seq,
            live_items,
            trackers,
            display,
            hlc,
        };
        let display_next = display + 1;
        let incarnation = match db.get(META_INCARNATION)? {
            Some(v) => uuid_at(&v, 0)?,
            None => {
                let inc = Uuid::new_v4();
                db.insert(META_INCARNATION, inc.as_bytes().as_slice())?;
                db.flush()?;
                inc
            }
        };
        let log_next = next_counter(&db, P_LOG, "log key is not 8 bytes")?;
        // Durable before any push can reach past the last durable change. A store that
        // cannot write it (a full disk) opens failed: reads only, pushes of durable changes.
        let marked = db
            .insert(META_OPEN, &[])
            .and_then(|_| match unclean {
                true => db
                    .insert(META_SEQ_FLOOR, &next_seq.to_be_bytes())
                    .map(|_| ()),
                false => Ok(()),
            })
            .and_then(|_| db.flush())
            .and_then(|_| Ok(log_file.sync_data()?));
        if let Err(e) = &marked {
            tracing::warn!(error = %e, "cannot mark the store open; it takes no writes");
        }
        let durable = std::sync::Arc::new(Durable {
            db: db.clone(),
            log_file,
            state: Mutex::new(FlushState {
                flushed: 0,
                // Everything below is durable: on disk, or the gap (its floor is).
                durable_seq: next_seq - 1,
                wanted: 0,
                in_progress: false,
                last_error: None,
                stop: false,
            }),
            flushed_cv: Condvar::new(),
            flushed_tx: tokio::sync::watch::Sender::new(0),
            wake_cv: Condvar::new(),
            writers: AtomicUsize::new(0),
            applied: AtomicU64::new(0),
            applied_seq: AtomicU64::new(next_seq - 1),
            group_wait_us: AtomicU64::new(GROUP_COMMIT_WAIT.as_micros() as u64),
            flushes: AtomicU64::new(0),
            io_failed: std::sync::atomic::AtomicBool::new(marked.is_err()),
            stale: Mutex::new(BTreeSet::new()),
        });
        let flusher = std::thread::Builder::new()
            .name("store-flush".into())
            .spawn({
                let durable = durable.clone();
                move || durable.run()
            })
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        Ok(Store {
            db,
            path: path.to_path_buf(),
            cache_bytes,
            incarnation,
            commit: Mutex::new(state),
            durable,
            flusher: Some(flusher),
            display_next: AtomicU64::new(display_next),
            log_next: AtomicU64::new(log_next),
            digests: Mutex::new(None),
            recent: Mutex::new(Recent {
                entries: Default::default(),
                bytes: 0,
                floor: next_seq - 1,
            }),
            view: std::sync::RwLock::new(()),
            #[cfg(test)]
            batch_only: false,
            #[cfg(test)]
            torn_after: None,
        })
    }

    /// The persisted clock high-water mark.
    pub fn hlc_high_water(&self) -> Hlc {
        self.commit.lock().expect("commit lock").hlc
    }

    /// Next number for a display id. Persisted with the item that uses it.
    pub fn next_display_number(&self) -> u64 {
        self.display_next.fetch_add(1, Ordering::SeqCst)
    }

    pub fn live_items(&self) -> u64 {
        self.commit.lock().expect("commit lock").live_items
    }

    pub fn tracker_count(&self) -> u64 {
        self.commit.lock().expect("commit lock").trackers
    }

    /// Last assigned change sequence number (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.commit.lock().expect("commit lock").next_seq - 1
    }

    /// Every change sequence number up to this one is durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable.state.lock().expect("flush lock").durable_seq
    }

    /// Whether a flush failed (disk full, I/O error): the store refuses writes until it is
    /// reopened (see `Node::store_recoverable`).
    pub fn failed(&self) -> bool {
        self.durable.io_failed.load(Ordering::SeqCst)
    }

    pub fn flush_count(&self) -> u64 {
        self.durable.flushes.load(Ordering::Relaxed)
    }

    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    pub fn doc_meta(&self, id: Uuid) -> Result<Option<DocMeta>> {
        let _view = self.view.read().expect("view lock");
        self.doc_meta_in_view(id)
    }

    /// [`Store::doc_meta`] for a caller holding `view`.
    fn doc_meta_in_view(&self, id: Uuid) -> Result<Option<DocMeta>> {
        let k = key(P_DOCMETA, &[id.as_bytes()]);
        match self.db.get(&k)? {
            None => Ok(None),
            Some(v) => DocMeta::decode(&v)
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt {
                    key: format!("H{id}"),
                    what: "document metadata",
                }),
        }
    }

    pub fn load_doc(&self, id: Uuid) -> Result<Option<DocBytes>> {
        let _view = self.view.read().expect("view lock");
        let Some(meta) = self.doc_meta_in_view(id)? else {
            return Ok(None);
        };
        let snapshot = self.snapshot_in_view(id)?;
        let (chunk_seqs, chunks) = self.chunks_in_view(id, &meta)?.into_iter().unzip();
        Ok(Some(DocBytes {
            meta,
            snapshot,
            chunks,
            chunk_seqs,
        }))
    }

    /// The snapshot of a document whose metadata the caller (holding `view`) has read.
    fn snapshot_in_view(&self, id: Uuid) -> Result<Vec<u8>> {
        Ok(self
            .db
            .get(key(P_SNAPSHOT, &[id.as_bytes()]))?
            .ok_or_else(|| StoreError::Corrupt {
                key: format!("S{id}"),
                what: "document has metadata but no snapshot",
            })?
            .to_vec())
    }

    /// The chunks `meta` counts, each with the sequence number it was written at. Only
    /// those: one past them is a torn write's (see `Ops::unseen`), never acknowledged, and
    /// the next write's key. The caller holds `view`.
    ///
    /// Read key by key: the count is known, and a sled 0.34 range costs a descent for its
    /// start and another to find its end, even over no keys at all (most documents have no
    /// chunks). Scanning was half the time of serving a catch-up page.
    fn chunks_in_view(&self, id: Uuid, meta: &DocMeta) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::with_capacity(meta.chunks as usize);
        for n in 0..meta.chunks {
            if let Some(v) = self
                .db
                .get(key(P_CHUNK, &[id.as_bytes(), &n.to_be_bytes()]))?
            {
                let (seq, bytes) = decode_chunk(&v);
                out.push((seq, bytes.to_vec()));
            }
        }
        Ok(out)
    }

    /// Apply one document write atomically with its indexes and counters. Not yet durable:
    /// call [`Store::wait_durable`] with the ticket before acknowledging it.
    pub fn commit(&self, w: DocWrite) -> Result<(Ticket, DocMeta)> {
        let (ticket, mut metas) = self.commit_batch(vec![w])?;
        Ok((ticket, metas.pop().expect("one meta per write")))
    }

    /// Apply several document writes as one atomic write (one ticket covers them all; see
    /// `Store::apply`). sled's cost is mostly per batch: measured here, 100 documents per
    /// batch cost a third of the CPU and half the bytes written of one batch each.
    pub fn commit_batch(&self, writes: Vec<DocWrite>) -> Result<(Ticket, Vec<DocMeta>)> {
        let absent = vec![false; writes.len()];
        let (ticket, metas, refused) = self.commit_batch_new(writes, &absent)?;
        debug_assert!(refused.is_empty());
        Ok((ticket, metas))
    }

    /// [`Store::commit_batch`], where `absent[i]` says the caller built `writes[i]` as a
    /// document new to the store without reading its metadata: such a write is left out if
    /// the document is stored after all (its index is returned; the caller merges it again).
    /// The check is made under the commit lock, where no batch can be under way: sled 0.34
    /// blocks every read while a batch applies, so a receiver merging a page on two threads
    /// would otherwise have one wait out the other's commit for its lookups.
    pub fn commit_batch_new(
        &self,
        writes: Vec<DocWrite>,
        absent: &[bool],
    ) -> Result<(Ticket, Vec<DocMeta>, Vec<usize>)> {
        let mut st = self.commit.lock().expect("commit lock");
        let before = (st.live_items, st.trackers, st.display);
        let mut next = CommitState {
            next_seq: st.next_seq,
            live_items: st.live_items,
            trackers: st.trackers,
            display: st.display,
            hlc: st.hlc,
        };
        let mut ops = Ops::default();
        // Metadata written earlier in this batch (a document may appear twice).
        let mut staged: HashMap<Uuid, DocMeta> = HashMap::new();
        let mut metas = Vec::with_capacity(writes.len());
        let keep = writes.len() <= RECENT_BATCH;
        let mut recent = Vec::with_capacity(writes.len());
        let mut refused = Vec::new();
        let mut moved = Vec::new();
        for (i, mut w) in writes.into_iter().enumerate() {
            let increment = w.increment.take();
            let old = match staged.get(&w.id) {
                Some(m) => Some(m.clone()),
                None => self.doc_meta(w.id)?,
            };
            if old.is_some() && absent.get(i).copied().unwrap_or(false) {
                refused.push(i);
                continue;
            }
            let id = w.id;
            let data = match (&w.data, increment) {
                (_, Some(changes)) if keep => changes,
                (DocData::Snapshot(b) | DocData::Chunk(b), _) if keep => b.clone(),
                _ => Vec::new(),
            };
            let meta = self.stage(&mut ops, &mut next, w, old, &mut moved);
            staged.insert(id, meta.clone());
            recent.push(FeedEntry {
                seq: meta.seq,
                id,
                meta: meta.clone(),
                data,
            });
            metas.push(meta);
        }
        // The state record is a hot key; rewrite it only when a counter moves. The clock
        // high-water mark rides along; between rewrites it is recovered at open from the
        // document written last (see `Store::last_written`).
        if (next.live_items, next.trackers, next.display) != before {
            ops.insert(META_STATE.to_vec(), next.encode());
        }
        if let Err(e) = self.apply(&ops) {
            // An I/O error here (a full disk) is as sticky as a failed flush.
            if matches!(e, sled::Error::Io(_)) {
                self.durable.io_failed.store(true, Ordering::SeqCst);
                return Err(StoreError::WriteFailed(e.to_string()));
            }
            return Err(e.into());
        }
        if let Some(index) = self.digests.lock().expect("digests lock").as_mut() {
            for (id, meta) in &staged {
                index.insert(*id, doc_digest(*id, &meta.heads));
            }
        }
        {
            let mut r = self.recent.lock().expect("recent lock");
            for e in recent {
                r.add(e, keep);
            }
        }
        self.durable.note_stale(moved);
        self.durable
            .applied_seq
            .store(next.next_seq - 1, Ordering::SeqCst);
        *st = next;
        let ticket = Ticket(self.durable.applied.fetch_add(1, Ordering::SeqCst) + 1);
        drop(st);
        self.durable.wake();
        Ok((ticket, metas, refused))
    }

    /// Apply a commit's writes atomically (under the commit lock).
    ///
    /// sled 0.34's `apply_batch` costs two writes of its log per call, each handed to its I/O
    /// thread pool and waited out there with `sync_file_range`, and it stops every reader
    /// while it applies; for one document that was most of a write's cost. So a small commit
    /// is applied as plain inserts instead: the inserts no reader sees yet ([`Ops::unseen`]),
    /// a redo record holding all the other writes, those writes, and the record's removal,
    /// all in the log buffer that the next flush writes out. sled recovers a prefix of its
    /// log, so after a crash either the record is missing (and so is every write after it;
    /// unseen inserts before it stay unread) or it is there and the next open finishes the
    /// commit from it ([`redo`]). Readers of more than one key ([`Store::load_doc`],
    /// [`Store::feed_doc`]) hold `view` for reading, so they never see half of one either.
    fn apply(&self, ops: &Ops) -> sled::Result<()> {
        #[cfg(test)]
        let batch_only = self.batch_only;
        #[cfg(not(test))]
        let batch_only = false;
        if ops.bytes() > SMALL_WRITE_BYTES || batch_only {
            return self.db.apply_batch(ops.to_batch());
        }
        let _view = self.view.write().expect("view lock");
        let redo = ops.encode();
        let steps = ops
            .unseen
            .iter()
            .map(|(k, v)| (k.as_slice(), Some(v.as_slice())))
            .chain(std::iter::once((META_REDO, Some(redo.as_slice()))))
            .chain(ops.writes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())))
            .chain(std::iter::once((META_REDO, None)));
        #[cfg(test)]
        let steps = {
            let cut = self.torn_after.unwrap_or(usize::MAX);
            let all = ops.unseen.len() + ops.writes.len() + 2;
            if cut < all {
                for (k, v) in steps.take(cut) {
                    match v {
                        Some(v) => self.db.insert(k, v)?,
                        None => self.db.remove(k)?,
                    };
                }
                return Err(sled::Error::Unsupported("torn on purpose".into()));
            }
            steps
        };
        for (k, v) in steps {
            match v {
                Some(v) => self.db.insert(k, v)?,
                None => self.db.remove(k)?,
            };
        }
        Ok(())
    }

    /// Add one document write to `ops`, moving the counters in `next`. The document's bytes
    /// and indexes come first, then its metadata, then its new place in the feed: a reader
    /// that walks the feed while a small write applies (see [`Store::commit_batch_new`]) finds
    /// the new feed entry only once the metadata it points to is there. The document's old
    /// place in the feed, if it had one, goes to `moved`.
    fn stage(
        &self,
        ops: &mut Ops,
        next: &mut CommitState,
        w: DocWrite,
        old: Option<DocMeta>,
        moved: &mut Vec<u64>,
    ) -> DocMeta {
        let id = w.id;
        let seq = next.next_seq;
        let (chunks, snapshot_seq) = match &w.data {
            DocData::Snapshot(bytes) => {
                let k = key(P_SNAPSHOT, &[id.as_bytes()]);
                match &old {
                    None => ops.insert_unseen(k, bytes.as_slice()),
                    // A compaction replaces a snapshot readers load.
                    Some(_) => ops.insert(k, bytes.as_slice()),
                }
                for n in 0..old.as_ref().map_or(0, |m| m.chunks) {
                    ops.remove(key(P_CHUNK, &[id.as_bytes(), &n.to_be_bytes()]));
                }
                (0, seq)
            }
            DocData::Chunk(bytes) => {
                let n = old.as_ref().map_or(0, |m| m.chunks);
                let mut value = Vec::with_capacity(9 + bytes.len());
                value.push(CHUNK_V1);
                value.extend_from_slice(&seq.to_be_bytes());
                value.extend_from_slice(bytes);
                // Past the count in the document's metadata until the metadata below.
                ops.insert_unseen(key(P_CHUNK, &[id.as_bytes(), &n.to_be_bytes()]), value);
                (n + 1, old.as_ref().map_or(0, |m| m.snapshot_seq))
            }
        };
        next.next_seq += 1;
        next.hlc = next.hlc.max(w.hlc);
        match w.kind {
            DocKind::Item => {
                if old.as_ref().is_none_or(|m| m.deleted != w.deleted) {
                    ops.insert(
                        key(P_ITEM_INDEX, &[w.tracker.as_bytes(), id.as_bytes()]),
                        [w.deleted as u8],
                    );
                }
                let was_live = old.as_ref().is_some_and(|m| !m.deleted);
                match (was_live, !w.deleted) {
                    (false, true) => next.live_items += 1,
                    (true, false) => next.live_items = next.live_items.saturating_sub(1),
                    _ => {}
                }
            }
            DocKind::Tracker => {
                if old.is_none() {
                    next.trackers += 1;
                    ops.insert(key(P_TRACKER, &[id.as_bytes()]), Vec::new());
                }
            }
        }
        if let Some(d) = &w.display_id {
            ops.insert(key(P_DISPLAY, &[d.as_bytes()]), id.as_bytes().as_slice());
            next.display = next
                .display
                .max(self.display_next.load(Ordering::SeqCst).saturating_sub(1));
        }
        if let Some(name) = &w.tracker_name {
            ops.insert(
                key(P_TRACKER_NAME, &[name.as_bytes()]),
                id.as_bytes().as_slice(),
            );
        }
        let meta = DocMeta {
            kind: w.kind,
            tracker: w.tracker,
            seq,
            heads: w.heads,
            chunks,
            deleted: w.deleted,
            source: w.source,
            snapshot_seq,
        };
        ops.insert(key(P_DOCMETA, &[id.as_bytes()]), meta.encode());
        ops.insert(
            key(P_SEQ, &[&seq.to_be_bytes()]),
            [id.as_bytes().as_slice(), &w.source.to_be_bytes()].concat(),
        );
        // The old feed entry stays until the flusher removes it (see `Durable::sweep`).
        if let Some(o) = &old {
            moved.push(o.seq);
        }
        meta
    }

    /// Block until the batch behind `ticket` is durable (group commit: one flush covers every
    /// batch applied before it began).
    pub fn wait_durable(&self, ticket: Ticket) -> Result<()> {
        self.settle(ticket, true).map(|_| ())
    }

    /// Ask for the batch behind `ticket` to be made durable, and say whether it is already
    /// (`true`) without waiting: the caller then waits without a thread
    /// ([`Store::flush_done`]).
    pub fn try_settle(&self, ticket: Ticket) -> Result<bool> {
        self.settle(ticket, false)
    }

    /// Wait, without holding a thread, until the batch behind `ticket` is durable.
    pub async fn flush_done(&self, ticket: Ticket) -> Result<()> {
        let mut done = self.durable.flushed_tx.subscribe();
        loop {
            // Mark the current value seen before reading the state: a flush that ends after
            // this read sends a new value, so `changed` below cannot miss it.
            done.borrow_and_update();
            if self.settle_inner(ticket, false)? {
                return Ok(());
            }
            if done.changed().await.is_err() {
                return Err(StoreError::FlushFailed("the store was closed".into()));
            }
        }
    }

    fn settle(&self, ticket: Ticket, wait: bool) -> Result<bool> {
        // This thread's writes have applied what they will apply before this flush.
        let mine = OWN_WRITES.get();
        if mine > 0 {
            self.durable.writers.fetch_sub(mine, Ordering::SeqCst);
        }
        let r = self.settle_inner(ticket, wait);
        if mine > 0 {
            self.durable.writers.fetch_add(mine, Ordering::SeqCst);
        }
        r
    }

    /// Whether `ticket` is durable; if not, want it flushed (waking the flusher) and, with
    /// `wait`, wait for that. An error if the flush that was to cover it failed.
    fn settle_inner(&self, ticket: Ticket, wait: bool) -> Result<bool> {
        let d = &self.durable;
        let mut st = d.state.lock().expect("flush lock");
        loop {
            if st.flushed >= ticket.0 {
                return Ok(true);
            }
            if let Some((e, upto)) = &st.last_error {
                if *upto >= ticket.0 && !st.in_progress {
                    return Err(StoreError::FlushFailed(e.clone()));
                }
            }
            st.wanted = st.wanted.max(ticket.0);
            // Also when it was wanted already: the writers the flusher waits for may be down
            // to none now (this one, settling, no longer counts).
            d.wake_cv.notify_all();
            if !wait {
                return Ok(false);
            }
            st = d.flushed_cv.wait(st).expect("flush lock");
        }
    }

    /// Register a write that will commit and wait for durability; the flusher waits
    /// (briefly) for registered writers to apply before flushing.
    pub fn begin_write(&self) -> WriteGuard<'_> {
        self.announce_write();
        self.adopt_write()
    }

    /// Register a write that has yet to reach the thread that will run it (an API request
    /// queued for the blocking pool): that thread takes the registration over with
    /// [`Store::adopt_write`], or it is given up with [`Store::withdraw_write`].
    pub fn announce_write(&self) {
        self.durable.writers.fetch_add(1, Ordering::SeqCst);
    }

    /// Take over a registration made by [`Store::announce_write`] on the calling thread.
    pub fn adopt_write(&self) -> WriteGuard<'_> {
        OWN_WRITES.set(OWN_WRITES.get() + 1);
        WriteGuard(self, std::marker::PhantomData)
    }

    /// Give up a registration made by [`Store::announce_write`] that no thread adopted.
    pub fn withdraw_write(&self) {
        self.durable.writers.fetch_sub(1, Ordering::SeqCst);
        self.durable.wake();
    }

    /// Flush everything, with the state record current.
    pub fn flush(&self) -> Result<()> {
        self.flush_inner(false)
    }

    /// [`Store::flush`] for a clean stop: the next open finds the store closed cleanly (no
    /// write may follow).
    pub fn flush_for_stop(&self) -> Result<()> {
        self.flush_inner(true)
    }

    fn flush_inner(&self, stop: bool) -> Result<()> {
        if stop {
            self.durable.sweep(SWEEP_AT_STOP);
        }
        let st = self.commit.lock().expect("commit lock");
        self.db.insert(META_STATE, st.encode())?;
        if stop {
            self.db.remove(META_OPEN)?;
        }
        drop(st);
        self.durable.sync()?;
        Ok(())
    }

    /// Flush, close, and open the store once more so sled writes its page-table snapshot,
    /// then close it again. sled 0.34 writes that snapshot only when it opens a store, after
    /// replaying the log written since the previous open: a node that wrote a million items
    /// since it started would otherwise pay that replay (seconds) at its next start. Done on
    /// a clean stop, the next start replays only what came after it. After a crash the next
    /// start pays it instead; nothing is lost either way.
    ///
    /// A store whose file has grown to several times its live data is also rewritten into a
    /// fresh directory then (see [`rewrite`]); a rewrite that fails leaves the store as it was.
    pub fn close_with_checkpoint(self) -> Result<()> {
        self.close_with(rewrite::Policy::default()).map(|_| ())
    }

    fn close_with(self, policy: rewrite::Policy) -> Result<Option<rewrite::Rewritten>> {
        self.flush_for_stop()?;
        let (path, cache_bytes) = (self.path.clone(), self.cache_bytes);
        drop(self);
        let t0 = Instant::now();
        // Opening replays the log and writes the snapshot; dropping closes it again. Everything
        // is durable already: if that fails (sled cannot open a store on a full disk), the
        // next start replays the log, as after a crash.
        let db = match open_sled(&path, cache_bytes) {
            Ok(db) => db,
            Err(e) => {
                tracing::warn!(error = %e, "store flushed but not checkpointed; the next start replays its log");
                return Ok(None);
            }
        };
        tracing::debug!(elapsed = ?t0.elapsed(), "store checkpointed");
        let (file, live) = match rewrite::due(&db, policy) {
            Ok(Some(sizes)) => sizes,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether the store needs a rewrite; left as it is");
                return Ok(None);
            }
        };
        // The copy takes about 2.6x the live data; leave the disk some room besides.
        let needed = 3 * live + (64 << 20);
        if let Some(free) = crate::config::free_bytes(&path).filter(|f| *f < needed) {
            tracing::info!(
                file,
                live,
                free,
                "the store's file holds several times its live data, but the disk lacks the room to rewrite it"
            );
            return Ok(None);
        }
        tracing::info!(
            file,
            live,
            "the store's file holds several times its live data: rewriting it"
        );
        match rewrite::rewrite(&path, db, cache_bytes) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                tracing::warn!(error = %e, "store rewrite failed; the store is as it was");
                Ok(None)
            }
        }
    }

    pub fn incarnation(&self) -> Uuid {
        self.incarnation
    }

    /// Documents changed after `since`, in sequence order: at most `max_entries` or about
    /// `max_bytes` of data. Returns the entries, the last sequence number covered and whether
    /// more follow. Reads store metadata and bytes only; never decodes Automerge. Documents
    /// whose [`DocMeta::source`] is `skip_source` are left out: the requester sent us exactly
    /// that state.
    pub fn feed_since(
        &self,
        since: u64,
        max_entries: usize,
        max_bytes: usize,
        skip_source: u64,
    ) -> Result<(Vec<FeedEntry>, u64, bool)> {
        self.feed_since_shared(since, since, max_entries, max_bytes, skip_source, None)
    }

    /// [`Store::feed_since`], leaving out documents of trackers not in `shared` (when given):
    /// a peer's share policy. `base` (at most `since`) is where the requester's run of pages
    /// began: it holds our documents as of then, so a document's chunks written after `base`
    /// are what it lacks (from 0, whole documents). Paging on from `since` alone would leave
    /// out a document's chunks written before `since` when the document moved past it before
    /// the requester read that far.
    pub fn feed_since_shared(
        &self,
        base: u64,
        since: u64,
        max_entries: usize,
        max_bytes: usize,
        skip_source: u64,
        shared: Option<&std::collections::HashSet<Uuid>>,
    ) -> Result<(Vec<FeedEntry>, u64, bool)> {
        self.feed_page(
            base.min(since),
            since,
            max_entries,
            max_bytes,
            skip_source,
            shared,
            false,
        )
    }

    /// [`Store::feed_since_shared`] for a bundle, whose reader cannot ask for what is missing:
    /// from `base` 0, each document whole (snapshot and every chunk); after a checkpoint, the
    /// chunks written after it, plus the snapshot when it may hold changes made after it too
    /// (no chunk predates the checkpoint, so the document may have been compacted since).
    pub fn feed_for_bundle(
        &self,
        base: u64,
        since: u64,
        max_entries: usize,
        max_bytes: usize,
        skip_source: u64,
        shared: Option<&std::collections::HashSet<Uuid>>,
    ) -> Result<(Vec<FeedEntry>, u64, bool)> {
        self.feed_page(
            base.min(since),
            since,
            max_entries,
            max_bytes,
            skip_source,
            shared,
            true,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn feed_page(
        &self,
        base: u64,
        since: u64,
        max_entries: usize,
        max_bytes: usize,
        skip_source: u64,
        shared: Option<&std::collections::HashSet<Uuid>>,
        whole: bool,
    ) -> Result<(Vec<FeedEntry>, u64, bool)> {
        // A store whose flush failed cannot make anything durable: it serves what already is.
        let failed = self.failed();
        let until = if failed { self.durable_seq() } else { u64::MAX };
        if until <= since {
            return Ok((Vec::new(), since, false));
        }
        let start = key(P_SEQ, &[&since.saturating_add(1).to_be_bytes()]);
        let end = key(P_SEQ, &[&until.to_be_bytes()]);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut last = since;
        for kv in self.db.range(start..=end) {
            let (k, v) = kv?;
            if out.len() >= max_entries || (bytes >= max_bytes && !out.is_empty()) {
                if !failed {
                    self.feed_durable()?;
                }
                return Ok((out, last, true));
            }
            let seq = feed_key_seq(&k)?;
            let id = uuid_at(&v, 0)?;
            last = seq;
            if from_reader(&v, skip_source) {
                continue;
            }
            let Some((meta, data)) = self.feed_doc(seq, id, base, whole, skip_source, shared)?
            else {
                continue;
            };
            bytes += data.len();
            out.push(FeedEntry {
                seq,
                id,
                meta,
                data,
            });
        }
        if !failed {
            self.feed_durable()?;
        }
        Ok((out, last, false))
    }

    /// What a feed page sends of document `id` to a requester that holds it as of `base`
    /// (see [`Store::feed_page`]), with its metadata; `None` if it is gone or left out for
    /// this requester. Reads the snapshot only when it is sent: a catch-up mostly sends one
    /// new chunk, and the snapshots are most of the store, so reading each one would pull a
    /// cold page per document.
    fn feed_doc(
        &self,
        seq: u64,
        id: Uuid,
        base: u64,
        whole: bool,
        skip_source: u64,
        shared: Option<&std::collections::HashSet<Uuid>>,
    ) -> Result<Option<(DocMeta, Vec<u8>)>> {
        let _view = self.view.read().expect("view lock");
        let Some(meta) = self.doc_meta_in_view(id)? else {
            return Ok(None);
        };
        if meta.seq > seq {
            // The document was written again since: it comes at its newer entry.
            self.found_stale(seq);
            return Ok(None);
        }
        if left_out(&meta, skip_source, shared) {
            return Ok(None);
        }
        let chunks = self.chunks_in_view(id, &meta)?;
        // A requester at checkpoint `base` got this document as of then: send only the chunks
        // written after it (if it missed some after all, it fetches with its heads). One
        // starting from nothing gets the whole document, and so does one that holds it as of
        // before its snapshot was written (created or compacted since).
        let whole_doc = chunks.is_empty()
            || base == 0
            || meta.snapshot_seq > base
            || (whole && chunks.iter().all(|(s, _)| *s > base));
        let data = if whole_doc {
            let mut all = self.snapshot_in_view(id)?;
            for (_, c) in &chunks {
                all.extend_from_slice(c);
            }
            all
        } else if chunks.iter().any(|(s, _)| *s > base) {
            chunks
                .iter()
                .filter(|(s, _)| *s > base)
                .flat_map(|(_, c)| c.iter().copied())
                .collect()
        } else {
            chunks.into_iter().flat_map(|(_, c)| c).collect()
        };
        Ok(Some((meta, data)))
    }

    /// A reader passed over a stale feed entry (one a crash kept from being removed): have
    /// the flusher remove it.
    fn found_stale(&self, seq: u64) {
        self.durable.note_stale([seq]);
        self.durable.wake();
    }

    /// [`Store::feed_since_shared`] answered from memory when the last changes cover
    /// everything after `since`: what a live push needs, without a thread hand-off or a read
    /// of sled. `None` when they do not (the caller reads the feed). A document changed more
    /// than once in the range comes once per change (each with its own bytes), where the feed
    /// would offer it once.
    ///
    /// Unlike [`Store::feed_page`], it does not wait for durability: a live push goes out while
    /// its change is being flushed (the flush is most of a write's latency). That is safe
    /// because memory holds every change in the range, an older state of a document too (a
    /// page read from sled could pass over a document's old position after it moved), and
    /// because sequence numbers are never reused: the push reaches at most [`SEQ_AHEAD`] past
    /// the last durable change, and a store reopened after a crash resumes numbering that far
    /// past what it finds. A receiver may then hold a change its source lost in a crash; the
    /// source's writer was never told it succeeded, and gets it back from the receiver. A
    /// store whose flush failed pushes durable changes only.
    pub fn feed_recent(
        &self,
        since: u64,
        max_entries: usize,
        max_bytes: usize,
        skip_source: u64,
        shared: Option<&std::collections::HashSet<Uuid>>,
    ) -> Option<(Vec<FeedEntry>, u64, bool)> {
        let durable = self.durable_seq();
        let limit = if self.failed() {
            durable
        } else {
            durable + SEQ_AHEAD
        };
        let r = self.recent.lock().expect("recent lock");
        if since < r.floor {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut last = since;
        for (e, with_data) in r
            .entries
            .iter()
            .filter(|e| e.0.seq > since && e.0.seq <= limit)
        {
            if out.len() >= max_entries || (bytes >= max_bytes && !out.is_empty()) {
                return Some((out, last, true));
            }
            last = e.seq;
            if left_out(&e.meta, skip_source, shared) {
                continue;
            }
            if !*with_data {
                // To be sent, and its bytes were not kept: read the feed.
                return None;
            }
            bytes += e.data.len();
            out.push(e.clone());
        }
        let applied = r.entries.back().map_or(since, |e| e.0.seq);
        Some((out, applied.min(limit).max(since), false))
    }

    /// A page of the feed goes out only once everything applied before it was read is
    /// durable. Otherwise a crash could take back what the reader was given, and its
    /// checkpoint would then skip whatever reuses those sequence numbers; or it could take
    /// back a write that moved a document to a new sequence number (removing its old feed
    /// entry) while the page was read, and the document's older, durable state would lie
    /// behind the reader's checkpoint unseen.
    fn feed_durable(&self) -> Result<()> {
        self.wait_durable(Ticket(self.durable.applied.load(Ordering::SeqCst)))
    }

    /// How many documents changed after `since` that a pull by the peer tagged `skip_source`
    /// would carry (see [`Store::feed_since_shared`]), counted up to `max`, looking at no
    /// more than `FEED_COUNT_LOOK` times `max` entries. Entries left out for the peer (its own
    /// changes, as after an initial sync from it) are not counted but cost a lookup each:
    /// unbounded, a status request after an unclean restart (which loses the unflushed
    /// position) read every document received from the peer, 0.4 s at 100,000. Past that
    /// many the count is a lower bound.
    pub fn feed_count_since(
        &self,
        since: u64,
        max: u64,
        skip_source: u64,
        shared: Option<&std::collections::HashSet<Uuid>>,
    ) -> Result<u64> {
        let start = key(P_SEQ, &[&since.saturating_add(1).to_be_bytes()]);
        let end = key(P_SEQ, &[&u64::MAX.to_be_bytes()]);
        let mut n = 0;
        let look = max.saturating_mul(FEED_COUNT_LOOK) as usize;
        for kv in self.db.range(start..=end).take(look) {
            let (k, v) = kv?;
            if from_reader(&v, skip_source) {
                continue;
            }
            let Some(m) = self.doc_meta(uuid_at(&v, 0)?)? else {
                continue;
            };
            let seq = feed_key_seq(&k)?;
            if m.seq > seq {
                self.found_stale(seq);
                continue;
            }
            if left_out(&m, skip_source, shared) {
                continue;
            }
            n += 1;
            if n >= max {
                break;
            }
        }
        Ok(n)
    }

    /// Our checkpoint on a peer's feed: (its incarnation, last sequence number applied).
    pub fn checkpoint(&self, peer: &[u8]) -> Result<Option<(Uuid, u64)>> {
        match self.db.get(key(P_CHECKPOINT, &[peer]))? {
            None => Ok(None),
            Some(v) if v.len() == 24 => Ok(Some((
                uuid_at(&v, 0)?,
                u64::from_be_bytes(v[16..24].try_into().expect("8 bytes")),
            ))),
            Some(_) => Err(StoreError::Corrupt {
                key: "K".into(),
                what: "checkpoint is not 24 bytes",
            }),
        }
    }

    /// Record a checkpoint. Call only once what it covers is durable; the checkpoint itself
    /// becomes durable with the next flush (a lost one only costs a re-pull). Within one
    /// incarnation of the peer's store it never moves backwards, whatever order saves land in.
    pub fn set_checkpoint(&self, peer: &[u8], incarnation: Uuid, seq: u64) -> Result<()> {
        self.set_position(P_CHECKPOINT, peer, incarnation, seq)
    }

    /// Every checkpoint we hold on other nodes' feeds: (peer id bytes, incarnation, seq).
    pub fn checkpoints(&self) -> Result<Vec<(Vec<u8>, Uuid, u64)>> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([P_CHECKPOINT]) {
            let (k, v) = kv?;
            if let Some((inc, seq)) = decode_position(&v) {
                out.push((k[1..].to_vec(), inc, seq));
            }
        }
        Ok(out)
    }

    /// What `peer` is known to hold of our feed: (the incarnation we presented, seq).
    pub fn peer_has(&self, peer: &[u8]) -> Result<Option<(Uuid, u64)>> {
        self.position(P_PEER_HAS, peer)
    }

    /// Record that `peer` holds our feed up to `seq` (it pulled from there, or told us in a
    /// bundle). Never moves backwards within one incarnation; not flushed on its own (a lost
    /// one only makes the next bundle for that peer larger).
    pub fn set_peer_has(&self, peer: &[u8], incarnation: Uuid, seq: u64) -> Result<()> {
        self.set_position(P_PEER_HAS, peer, incarnation, seq)
    }

    /// Where the last page served to `peer` ended: (the incarnation we presented, seq). Once
    /// the peer takes that page it holds our feed up to there; it may not have yet, so this
    /// is for counting what it lacks, not for where a bundle for it starts ([`Store::peer_has`]).
    pub fn peer_served(&self, peer: &[u8]) -> Result<Option<(Uuid, u64)>> {
        self.position(P_SERVED, peer)
    }

    /// Record where the page just served to `peer` ended. The latest page's end, even if
    /// lower (the peer started over); not flushed on its own (a lost one only makes the next
    /// count after a restart read more).
    pub fn set_peer_served(&self, peer: &[u8], incarnation: Uuid, seq: u64) -> Result<()> {
        let v = [incarnation.as_bytes().as_slice(), &seq.to_be_bytes()].concat();
        self.db.insert(key(P_SERVED, &[peer]), v)?;
        Ok(())
    }

    /// A position on a feed kept under `prefix` for `peer`: (incarnation, seq).
    fn position(&self, prefix: u8, peer: &[u8]) -> Result<Option<(Uuid, u64)>> {
        Ok(self
            .db
            .get(key(prefix, &[peer]))?
            .and_then(|v| decode_position(&v)))
    }

    fn set_position(&self, prefix: u8, peer: &[u8], incarnation: Uuid, seq: u64) -> Result<()> {
        let v = [incarnation.as_bytes().as_slice(), &seq.to_be_bytes()].concat();
        self.db
            .fetch_and_update(key(prefix, &[peer]), |old| match old {
                Some(o)
                    if o.len() == 24
                        && o[..16] == incarnation.as_bytes()[..]
                        && u64::from_be_bytes(o[16..24].try_into().expect("8 bytes")) > seq =>
                {
                    Some(o.to_vec())
                }
                _ => Some(v.clone()),
            })?;
        Ok(())
    }

    /// Stored peer configurations (JSON), keyed by peer id text.
    pub fn peers(&self) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([P_PEER]) {
            out.push(kv?.1.to_vec());
        }
        Ok(out)
    }

    pub fn put_peer(&self, peer_id: &str, config: &[u8]) -> Result<()> {
        self.db.insert(key(P_PEER, &[peer_id.as_bytes()]), config)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn remove_peer(&self, peer_id: &str) -> Result<bool> {
        let existed = self
            .db
            .remove(key(P_PEER, &[peer_id.as_bytes()]))?
            .is_some();
        self.db.flush()?;
        Ok(existed)
    }

    /// Append a sync log entry (JSON); returns its number. The oldest entry past
    /// [`LOG_MAX_ENTRIES`] is dropped. Not flushed on its own: it becomes durable with the
    /// next flush (a log entry is not an acknowledged write).
    pub fn append_log(&self, entry: &[u8]) -> Result<u64> {
        let n = self.log_next.fetch_add(1, Ordering::SeqCst);
        let mut batch = sled::Batch::default();
        batch.insert(key(P_LOG, &[&n.to_be_bytes()]), entry);
        if n > LOG_MAX_ENTRIES {
            batch.remove(key(P_LOG, &[&(n - LOG_MAX_ENTRIES).to_be_bytes()]));
        }
        self.db.apply_batch(batch)?;
        Ok(n)
    }

    /// Sync log entries, newest first: (number, JSON), at most `limit` that `keep` accepts.
    pub fn log_entries(
        &self,
        limit: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([P_LOG]).rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let n = u64::from_be_bytes(k[1..].try_into().map_err(|_| StoreError::Corrupt {
                key: "L".into(),
                what: "log key is not 8 bytes",
            })?);
            if keep(&v) {
                out.push((n, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// When a peer's scheduled sync last ran (ms since the epoch).
    pub fn last_run(&self, peer: &[u8]) -> Result<Option<u64>> {
        Ok(self
            .db
            .get(key(P_LAST_RUN, &[peer]))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    pub fn set_last_run(&self, peer: &[u8], ms: u64) -> Result<()> {
        self.db
            .insert(key(P_LAST_RUN, &[peer]), &ms.to_be_bytes())?;
        Ok(())
    }

    /// The losing values of an item a user acknowledged: (field, loser stamp as text).
    pub fn acks(&self, item: Uuid) -> Result<Vec<(String, String)>> {
        match self.db.get(key(P_ACK, &[item.as_bytes()]))? {
            None => Ok(Vec::new()),
            Some(v) => serde_json::from_slice(&v).map_err(|_| StoreError::Corrupt {
                key: format!("A{item}"),
                what: "conflict acknowledgements",
            }),
        }
    }

    /// Record acknowledgements for an item (replacing its list), durably.
    pub fn set_acks(&self, item: Uuid, acks: &[(String, String)]) -> Result<()> {
        let v = serde_json::to_vec(acks).expect("pairs of strings serialize");
        self.db.insert(key(P_ACK, &[item.as_bytes()]), v)?;
        self.db.flush()?;
        Ok(())
    }

    /// Forget our checkpoint on a peer's feed (the peer was removed: meeting it again is a
    /// first contact, reconciled by summaries).
    pub fn remove_checkpoint(&self, peer: &[u8]) -> Result<()> {
        self.db.remove(key(P_CHECKPOINT, &[peer]))?;
        Ok(())
    }

    /// Run `f` on the digest index (id -> [`doc_digest`]) of every document, building it on
    /// first use from the stored metadata.
    pub fn with_digests<R>(&self, f: impl FnOnce(&BTreeMap<Uuid, u128>) -> R) -> Result<R> {
        let mut guard = self.digests.lock().expect("digests lock");
        if guard.is_none() {
            let mut index = BTreeMap::new();
            for kv in self.db.scan_prefix([P_DOCMETA]) {
                let (k, v) = kv?;
                let id = uuid_at(&k, 1)?;
                let meta = DocMeta::decode(&v).ok_or_else(|| StoreError::Corrupt {
                    key: format!("H{id}"),
                    what: "document metadata",
                })?;
                index.insert(id, doc_digest(id, &meta.heads));
            }
            *guard = Some(index);
        }
        Ok(f(guard.as_ref().expect("built above")))
    }

    /// Documents stored (items, deleted ones included, and trackers).
    pub fn doc_count(&self) -> Result<u64> {
        self.with_digests(|d| d.len() as u64)
    }

    /// The document written last (highest change sequence number), if any.
    pub fn last_written(&self) -> Result<Option<Uuid>> {
        match self.db.scan_prefix([P_SEQ]).next_back() {
            Some(kv) => Ok(Some(uuid_at(&kv?.1, 0)?)),
            None => Ok(None),
        }
    }

    pub fn tracker_ids(&self) -> Result<Vec<Uuid>> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([P_TRACKER]) {
            let (k, _) = kv?;
            out.push(uuid_at(&k, 1)?);
        }
        Ok(out)
    }

    pub fn tracker_by_name(&self, name: &str) -> Result<Option<Uuid>> {
        self.db
            .get(key(P_TRACKER_NAME, &[name.as_bytes()]))?
            .map(|v| uuid_at(&v, 0))
            .transpose()
    }

    pub fn item_by_display_id(&self, display: &str) -> Result<Option<Uuid>> {
        self.db
            .get(key(P_DISPLAY, &[display.as_bytes()]))?
            .map(|v| uuid_at(&v, 0))
            .transpose()
    }

    /// Items of `tracker` in id order after `after`; at most `limit`. `deleted` filters by the
    /// deleted flag when given. Returns the ids and whether more follow.
    pub fn items_of_tracker(
        &self,
        tracker: Uuid,
        after: Option<Uuid>,
        limit: usize,
        deleted: Option<bool>,
    ) -> Result<(Vec<Uuid>, bool)> {
        let prefix = key(P_ITEM_INDEX, &[tracker.as_bytes()]);
        let start = match after {
            // The first key strictly after `after`: append a byte.
            Some(a) => {
                let mut k = key(P_ITEM_INDEX, &[tracker.as_bytes(), a.as_bytes()]);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for kv in self.db.range(start..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            let is_deleted = v.first().copied().unwrap_or(0) != 0;
            if deleted.is_some_and(|d| d != is_deleted) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(uuid_at(&k, 17)?);
        }
        Ok((out, false))
    }
}

/// Ends a write's registration with the group commit (see [`Store::begin_write`]). Not
/// `Send`: it is counted in its thread's `OWN_WRITES`.
pub struct WriteGuard<'a>(&'a Store, std::marker::PhantomData<*const ()>);

impl Drop for Store {
    fn drop(&mut self) {
        self.durable.state.lock().expect("flush lock").stop = true;
        self.durable.wake_cv.notify_all();
        if let Some(flusher) = self.flusher.take() {
            if flusher.join().is_err() {
                tracing::error!("the store's flusher thread panicked");
            }
        }
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        OWN_WRITES.set(OWN_WRITES.get() - 1);
        self.0.durable.writers.fetch_sub(1, Ordering::SeqCst);
        // A write that ends without committing (nothing changed, refused, failed) must not
        // keep the flusher waiting for it.
        self.0.durable.wake();
    }
}

/// Whether the feed entry `v` is a change the reader tagged `skip_source` sent us, which the
/// feed leaves out for it (see [`left_out`]): told by the entry itself, without a read of the
/// document's metadata. After an initial sync from a peer every entry is one, and a status
/// after a restart, counting what that peer lacks, read each one's metadata cold. (Whether
/// the entry is stale does not matter: the document comes at its newer entry either way.)
/// Entries written before the source was kept in them say nothing.
fn from_reader(v: &[u8], skip_source: u64) -> bool {
    skip_source != 0
        && v.get(16..24)
            .is_some_and(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")) == skip_source)
}

/// The sequence number of a feed entry's key.
fn feed_key_seq(k: &[u8]) -> Result<u64> {
    k.get(1..9)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            key: "Q".into(),
            what: "sequence key is not 8 bytes",
        })
}

fn uuid_at(b: &[u8], at: usize) -> Result<Uuid> {
    b.get(at..at + 16)
        .and_then(|s| s.try_into().ok())
        .map(Uuid::from_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            key: String::from_utf8_lossy(b).into_owned(),
            what: "expected a 16-byte id",
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commit `writes` in order, one write each (sequence numbers 1, 2, … in a new store).
    pub(super) fn commit_all(
        store: &Store,
        writes: impl IntoIterator<Item = (Uuid, Uuid, DocData)>,
    ) {
        for (id, t, data) in writes {
            store.commit(write(id, t, data, false)).expect("commit");
        }
    }

    /// Every key and value but the node metadata (`M`) and stale feed entries (whose removal
    /// the flusher may or may not have got to), in key order.
    pub(super) fn data_keys(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
        store
            .db
            .iter()
            .map(|kv| kv.expect("read"))
            .filter(|(k, v)| k[0] != b'M' && !(k[0] == P_SEQ && stale_entry(store, k, v)))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    /// Whether the feed entry `k` -> `v` is stale: its document moved past it.
    fn stale_entry(store: &Store, k: &[u8], v: &[u8]) -> bool {
        let seq = feed_key_seq(k).expect("feed key");
        let meta = store.doc_meta(uuid_at(v, 0).expect("id")).expect("meta");
        meta.is_some_and(|m| m.seq > seq)
    }

    /// The feed entries in the store, stale ones included: (sequence number, document).
    fn raw_feed(store: &Store) -> Vec<(u64, Uuid)> {
        store
            .db
            .scan_prefix([P_SEQ])
            .map(|kv| kv.expect("read"))
            .map(|(k, v)| (feed_key_seq(&k).expect("seq"), uuid_at(&v, 0).expect("id")))
            .collect()
    }

    /// The bytes of the one document a feed page holds.
    fn only_data(page: Vec<FeedEntry>) -> Vec<u8> {
        assert_eq!(page.len(), 1, "one document");
        page.into_iter().next().expect("the document").data
    }

    fn write(id: Uuid, tracker: Uuid, data: DocData, deleted: bool) -> DocWrite {
        DocWrite {
            id,
            kind: DocKind::Item,
            tracker,
            deleted,
            heads: vec![[1; 32]],
            data,
            display_id: None,
            tracker_name: None,
            hlc: Hlc::default(),
            source: 0,
            increment: None,
        }
    }

    #[test]
    fn a_flush_waits_for_other_writes_under_way_and_not_for_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        // Long enough that a flush which waited out the window cannot pass for one that did not.
        store
            .durable
            .group_wait_us
            .store(60_000_000, Ordering::Relaxed);
        let t = Uuid::now_v7();
        let commit_and_wait = |store: &Store| {
            let ticket = store
                .commit(write(Uuid::now_v7(), t, DocData::Snapshot(vec![1]), false))
                .expect("commit")
                .0;
            store.wait_durable(ticket).expect("durable");
        };

        // A lone write: its own registration does not hold up its flush.
        let started = Instant::now();
        let flushes = store.flush_count();
        {
            let _writing = store.begin_write();
            commit_and_wait(&store);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited for itself"
        );
        assert_eq!(store.flush_count(), flushes + 1);

        // A write announced before it reaches its thread (as the API does): the flush led
        // meanwhile waits for it to apply, and one flush covers both. Also pending: a write
        // that applied and no longer waits on a thread (an API write deferred to a task),
        // which must not count for the one still to come.
        let flushes = store.flush_count();
        store
            .commit(write(Uuid::now_v7(), t, DocData::Snapshot(vec![1]), false))
            .expect("commit");
        store.announce_write();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _writing = store.adopt_write();
                let deadline = Instant::now() + Duration::from_secs(30);
                while !store.durable.state.lock().expect("flush lock").in_progress {
                    assert!(Instant::now() < deadline, "no flush was led");
                    std::thread::yield_now();
                }
                commit_and_wait(&store);
            });
            let _writing = store.begin_write();
            commit_and_wait(&store);
        });
        assert_eq!(store.flush_count(), flushes + 1, "one flush for the group");

        // An announced write that never runs is withdrawn, and holds up no flush.
        store.announce_write();
        store.withdraw_write();
        let started = Instant::now();
        commit_and_wait(&store);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited for a withdrawn write"
        );
        assert_eq!(store.durable.writers.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_waiting_count_skips_the_peers_own_changes_within_a_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let t = Uuid::now_v7();
        let commit = |source: u64| {
            let w = DocWrite {
                source,
                ..write(Uuid::now_v7(), t, DocData::Snapshot(vec![1]), false)
            };
            store.commit(w).expect("commit");
        };
        // Ours, then many received from peer 7, then ours again.
        for _ in 0..3 {
            commit(0);
        }
        for _ in 0..40 {
            commit(7);
        }
        for _ in 0..5 {
            commit(0);
        }
        // Peer 7 lacks our 8, not its own 40; another peer lacks all 48.
        assert_eq!(store.feed_count_since(0, 100, 7, None).expect("count"), 8);
        assert_eq!(store.feed_count_since(0, 100, 9, None).expect("count"), 48);
        assert_eq!(store.feed_count_since(0, 5, 9, None).expect("count"), 5);
        // Counting up to 2 stops at our first 2.
        assert_eq!(store.feed_count_since(0, 2, 7, None).expect("count"), 2);
        // From after those 3, the 20 changes it looks at are all peer 7's: 0, a lower bound
        // (our 5 lie past them).
        assert_eq!(store.feed_count_since(3, 2, 7, None).expect("count"), 0);
    }

    /// Wait until `cond` holds, for at most 30 s.
    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_documents_old_feed_entry_is_skipped_until_the_flusher_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (a, b, t) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        // While a write is under way the flusher leaves stale entries alone.
        let writing = store.begin_write();
        let seq = |w| store.commit(w).expect("commit").1.seq;
        let a1 = seq(write(a, t, DocData::Snapshot(b"a".to_vec()), false));
        let b1 = seq(write(b, t, DocData::Snapshot(b"b".to_vec()), false));
        let a2 = seq(write(a, t, DocData::Chunk(b"a2".to_vec()), false));
        let a3 = seq(write(a, t, DocData::Chunk(b"a3".to_vec()), false));
        assert_eq!(raw_feed(&store), vec![(a1, a), (b1, b), (a2, a), (a3, a)]);

        // Readers see each document once, at its last write.
        let (page, last, more) = store.feed_since(0, 10, 1 << 20, 0).expect("feed");
        let got: Vec<(u64, Uuid)> = page.iter().map(|e| (e.seq, e.id)).collect();
        assert_eq!(got, vec![(b1, b), (a3, a)]);
        assert_eq!((last, more), (a3, false));
        assert_eq!(store.feed_count_since(0, 10, 9, None).expect("count"), 2);

        // Once no write is under way, the flusher removes the old entries.
        drop(writing);
        wait_for("stale entries removed", || {
            raw_feed(&store) == vec![(b1, b), (a3, a)]
        });

        // An entry left behind by a crash (the note of it lived in memory only) is skipped,
        // and the first reader that passes over it has it removed.
        store
            .db
            .insert(key(P_SEQ, &[&a2.to_be_bytes()]), a.as_bytes().as_slice())
            .expect("insert");
        let (page, _, _) = store.feed_since(0, 10, 1 << 20, 0).expect("feed");
        assert_eq!(page.len(), 2);
        wait_for("the leftover entry removed", || {
            raw_feed(&store) == vec![(b1, b), (a3, a)]
        });

        // A clean stop removes what the flusher has not got to.
        let writing = store.begin_write();
        let a4 = seq(write(a, t, DocData::Chunk(b"a4".to_vec()), false));
        assert!(raw_feed(&store).contains(&(a3, a)));
        store.flush_for_stop().expect("flush");
        assert_eq!(raw_feed(&store), vec![(b1, b), (a4, a)]);
        drop(writing);
    }

    #[test]
    fn a_feed_entry_names_its_source_and_old_entries_without_it_still_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let t = Uuid::now_v7();
        let commit = |id: Uuid, source: u64| {
            let w = DocWrite {
                source,
                ..write(id, t, DocData::Snapshot(vec![1]), false)
            };
            store.commit(w).expect("commit").1.seq
        };
        let (ours, theirs) = (Uuid::now_v7(), Uuid::now_v7());
        let s_ours = commit(ours, 0);
        let s_theirs = commit(theirs, 7);
        let entry = |seq: u64| {
            store
                .db
                .get(key(P_SEQ, &[&seq.to_be_bytes()]))
                .expect("read")
                .expect("entry")
                .to_vec()
        };
        assert_eq!(
            entry(s_theirs),
            [theirs.as_bytes().as_slice(), &7u64.to_be_bytes()].concat()
        );
        assert!(from_reader(&entry(s_theirs), 7));
        assert!(!from_reader(&entry(s_theirs), 9) && !from_reader(&entry(s_ours), 7));

        let ids = |skip: u64| -> Vec<Uuid> {
            let (page, _, _) = store.feed_since(0, 10, 1 << 20, skip).expect("feed");
            page.iter().map(|e| e.id).collect()
        };
        assert_eq!(ids(7), vec![ours]);
        assert_eq!(ids(9), vec![ours, theirs]);
        assert_eq!(store.feed_count_since(0, 10, 7, None).expect("count"), 1);

        // An entry as stores wrote them before (the id alone): the metadata decides.
        store
            .db
            .insert(
                key(P_SEQ, &[&s_theirs.to_be_bytes()]),
                theirs.as_bytes().as_slice(),
            )
            .expect("insert");
        assert!(!from_reader(&entry(s_theirs), 7));
        assert_eq!(ids(7), vec![ours]);
        assert_eq!(ids(9), vec![ours, theirs]);
        assert_eq!(store.feed_count_since(0, 10, 7, None).expect("count"), 1);
    }

    #[test]
    fn what_a_peer_holds_only_moves_forward_and_what_it_was_served_is_the_latest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (peer, inc) = (b"peer".as_slice(), Uuid::now_v7());
        assert_eq!(store.peer_has(peer).expect("read"), None);
        assert_eq!(store.peer_served(peer).expect("read"), None);
        for seq in [10, 5] {
            store.set_peer_has(peer, inc, seq).expect("write");
            store.set_peer_served(peer, inc, seq).expect("write");
        }
        // A bundle for the peer starts where it surely is; the count of what it lacks, from
        // the last page it was sent (it started over at 5).
        assert_eq!(store.peer_has(peer).expect("read"), Some((inc, 10)));
        assert_eq!(store.peer_served(peer).expect("read"), Some((inc, 5)));
        // Another incarnation replaces either.
        let other = Uuid::now_v7();
        store.set_peer_has(peer, other, 3).expect("write");
        assert_eq!(store.peer_has(peer).expect("read"), Some((other, 3)));
    }

    #[test]
    fn chunks_append_and_snapshot_replaces_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (id, t) = (Uuid::now_v7(), Uuid::now_v7());
        store
            .commit(write(id, t, DocData::Snapshot(b"s1".to_vec()), false))
            .expect("commit");
        store
            .commit(write(id, t, DocData::Chunk(b"c1".to_vec()), false))
            .expect("commit");
        let (ticket, _) = store
            .commit(write(id, t, DocData::Chunk(b"c2".to_vec()), false))
            .expect("commit");
        store.wait_durable(ticket).expect("durable");
        let d = store.load_doc(id).expect("load").expect("exists");
        assert_eq!(d.snapshot, b"s1");
        assert_eq!(d.chunks, vec![b"c1".to_vec(), b"c2".to_vec()]);
        assert_eq!(d.meta.seq, 3);
        store
            .commit(write(id, t, DocData::Snapshot(b"s2".to_vec()), true))
            .expect("commit");
        let d = store.load_doc(id).expect("load").expect("exists");
        assert_eq!(
            (d.snapshot.as_slice(), d.chunks.len(), d.meta.chunks),
            (&b"s2"[..], 0, 0)
        );
        assert_eq!(store.live_items(), 0, "deleting the only item");
        let (ids, more) = store
            .items_of_tracker(t, None, 10, Some(true))
            .expect("list");
        assert_eq!((ids, more), (vec![id], false));
    }

    #[test]
    fn feed_sends_only_chunks_written_after_the_checkpoint_and_whole_documents_from_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (id, t) = (Uuid::now_v7(), Uuid::now_v7());
        commit_all(
            &store,
            [
                DocData::Snapshot(b"s1".to_vec()),
                DocData::Chunk(b"c1".to_vec()),
                DocData::Chunk(b"c2".to_vec()),
                DocData::Chunk(b"c3".to_vec()),
            ]
            .map(|d| (id, t, d)),
        );
        // Seqs: s1 = 1, c1 = 2, c2 = 3, c3 = 4.
        let data = |since| {
            let (entries, last, _) = store.feed_since(since, 10, 1 << 20, 0).expect("feed");
            assert_eq!(last, 4);
            only_data(entries)
        };
        // From nothing: the whole document.
        assert_eq!(data(0), b"s1c1c2c3");
        assert_eq!(data(1), b"c1c2c3");
        assert_eq!(data(2), b"c2c3");
        assert_eq!(data(3), b"c3");
        // A bundle's reader cannot ask for more: with no chunk at or before the checkpoint
        // (the snapshot may be newer than it), the snapshot goes too.
        let bundle = |since| {
            let (entries, _, _) = store
                .feed_for_bundle(since, since, 10, 1 << 20, 0, None)
                .expect("feed");
            only_data(entries)
        };
        assert_eq!(bundle(1), b"s1c1c2c3");
        assert_eq!(bundle(2), b"c2c3");
        let d = store.load_doc(id).expect("load").expect("exists");
        assert_eq!(d.chunk_seqs, vec![2, 3, 4]);
    }

    #[test]
    fn later_pages_of_a_run_send_what_changed_since_the_run_began() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let t = Uuid::now_v7();
        let (x, y, z) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        // Seqs: x snapshot 1, x chunk 2, y 3, z 4, x chunk 5 (x moves to 5).
        commit_all(
            &store,
            [
                (x, t, DocData::Snapshot(b"s".to_vec())),
                (x, t, DocData::Chunk(b"c1".to_vec())),
                (y, t, DocData::Snapshot(b"y".to_vec())),
                (z, t, DocData::Snapshot(b"z".to_vec())),
                (x, t, DocData::Chunk(b"c2".to_vec())),
            ],
        );
        // A run from nothing, two documents a page: the first page is y and z; x comes in
        // the second, after x's first chunk, which the requester never got.
        let (page, last, more) = store.feed_since(0, 2, 1 << 20, 0).expect("feed");
        let ids: Vec<Uuid> = page.iter().map(|e| e.id).collect();
        assert_eq!((ids, last, more), (vec![y, z], 4, true));
        let (page, _, _) = store
            .feed_since_shared(0, 4, 2, 1 << 20, 0, None)
            .expect("feed");
        assert_eq!(only_data(page), b"sc1c2");
        let (page, _, _) = store
            .feed_for_bundle(0, 4, 2, 1 << 20, 0, None)
            .expect("feed");
        assert_eq!(only_data(page), b"sc1c2");
        // A run that began at 2 holds x's first chunk: only the second goes.
        let (page, _, _) = store
            .feed_since_shared(2, 4, 2, 1 << 20, 0, None)
            .expect("feed");
        assert_eq!(only_data(page), b"c2");
        let (page, _, _) = store
            .feed_for_bundle(2, 4, 2, 1 << 20, 0, None)
            .expect("feed");
        assert_eq!(only_data(page), b"c2");
    }

    #[test]
    fn a_reader_from_before_a_compaction_gets_the_new_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (id, t) = (Uuid::now_v7(), Uuid::now_v7());
        // Seqs: snapshot 1, chunk 2, compaction 3 (a new snapshot, the chunk folded in),
        // chunk 4.
        commit_all(
            &store,
            [
                DocData::Snapshot(b"s1".to_vec()),
                DocData::Chunk(b"c2".to_vec()),
                DocData::Snapshot(b"s3".to_vec()),
                DocData::Chunk(b"c4".to_vec()),
            ]
            .map(|d| (id, t, d)),
        );
        assert_eq!(
            store
                .doc_meta(id)
                .expect("meta")
                .expect("exists")
                .snapshot_seq,
            3
        );
        let data = |since| only_data(store.feed_since(since, 10, 1 << 20, 0).expect("feed").0);
        // At 1 or 2 the reader lacks what the compaction folded in (its own chunk 2 is gone).
        assert_eq!(data(1), b"s3c4");
        assert_eq!(data(2), b"s3c4");
        // At 3 it holds the snapshot's state: only the chunk after it.
        assert_eq!(data(3), b"c4");
    }

    #[test]
    fn metadata_written_before_snapshot_seqs_were_kept_still_reads() {
        let meta = DocMeta {
            kind: DocKind::Item,
            tracker: Uuid::now_v7(),
            seq: 9,
            heads: vec![[7; 32], [8; 32]],
            chunks: 2,
            deleted: false,
            source: 5,
            snapshot_seq: 4,
        };
        let now = meta.encode();
        assert_eq!(DocMeta::decode(&now), Some(meta.clone()));
        // The earlier format ends with the source.
        let before = &now[..now.len() - 8];
        assert_eq!(
            DocMeta::decode(before),
            Some(DocMeta {
                snapshot_seq: 0,
                ..meta
            })
        );
        assert_eq!(DocMeta::decode(&now[..now.len() - 4]), None);
    }

    #[test]
    fn the_sync_log_rotates_and_reads_newest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            for n in 0..LOG_MAX_ENTRIES + 5 {
                store.append_log(n.to_string().as_bytes()).expect("append");
            }
            store.flush().expect("flush");
        }
        // Numbering continues after a reopen; the oldest entries are gone.
        let store = Store::open(dir.path()).expect("reopen");
        let n = store.append_log(b"last").expect("append");
        assert_eq!(n, LOG_MAX_ENTRIES + 6);
        let all = store.log_entries(usize::MAX, |_| true).expect("read");
        assert_eq!(all.len() as u64, LOG_MAX_ENTRIES);
        assert_eq!(all[0], (n, b"last".to_vec()));
        assert_eq!(all[1].1, (LOG_MAX_ENTRIES + 4).to_string().into_bytes());
        assert!(all.windows(2).all(|w| w[0].0 > w[1].0));
        let even = store
            .log_entries(3, |v| {
                v.last().is_some_and(|b| b.is_ascii_digit() && b % 2 == 0)
            })
            .expect("filter");
        let numbers: Vec<u64> = even.iter().map(|(n, _)| *n).collect();
        // Entry k holds the number k - 1.
        assert_eq!(numbers, vec![n - 1, n - 3, n - 5]);
    }

    /// A tracker, two items, an edit (a chunk), a compaction (a snapshot replacing the
    /// chunk), a delete, and one batch writing a document twice.
    fn mixed_writes(t: Uuid, a: Uuid, b: Uuid) -> Vec<Vec<DocWrite>> {
        let mut tracker = write(t, t, DocData::Snapshot(b"tracker".to_vec()), false);
        tracker.kind = DocKind::Tracker;
        tracker.tracker_name = Some("cases".into());
        let mut first = write(a, t, DocData::Snapshot(vec![1; 300]), false);
        first.display_id = Some("N-1".into());
        vec![
            vec![tracker],
            vec![first],
            vec![write(b, t, DocData::Snapshot(vec![2; 40]), false)],
            vec![write(a, t, DocData::Chunk(vec![3; 20]), false)],
            vec![write(a, t, DocData::Snapshot(vec![4; 320]), false)],
            vec![write(b, t, DocData::Chunk(vec![5; 8]), true)],
            vec![
                write(a, t, DocData::Chunk(vec![6; 9]), false),
                write(a, t, DocData::Chunk(vec![7; 9]), false),
            ],
        ]
    }

    #[test]
    fn small_writes_leave_the_keys_a_batch_does() {
        let (t, a, b) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let run = |batch_only: bool| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut store = Store::open(dir.path()).expect("open");
            store.batch_only = batch_only;
            for writes in mixed_writes(t, a, b) {
                store.commit_batch(writes).expect("commit");
            }
            assert!(store.db.get(META_REDO).expect("read").is_none());
            (
                data_keys(&store),
                store.live_items(),
                store.tracker_count(),
                store.last_seq(),
            )
        };
        let batched = run(true);
        assert_eq!(batched.1, 1, "b was deleted");
        assert_eq!(run(false), batched);
    }

    #[test]
    fn a_small_write_cut_short_by_a_crash_is_finished_at_open_or_never_seen() {
        let (t, a, b) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let all = mixed_writes(t, a, b);
        // What readers see: documents, counters, listing, lookups and the feed.
        type Doc = Option<(DocMeta, Vec<u8>, Vec<Vec<u8>>)>;
        type Visible = (
            Vec<Doc>,
            u64,
            u64,
            Vec<Uuid>,
            Vec<(u64, Uuid)>,
            [Option<Uuid>; 2],
        );
        let visible = |store: &Store| -> Visible {
            let docs = [t, a, b]
                .iter()
                .map(|id| {
                    let d = store.load_doc(*id).expect("load")?;
                    Some((d.meta, d.snapshot, d.chunks))
                })
                .collect();
            let (listed, _) = store.items_of_tracker(t, None, 100, None).expect("list");
            let (feed, _, _) = store.feed_since(0, 1000, usize::MAX, 0).expect("feed");
            (
                docs,
                store.live_items(),
                store.tracker_count(),
                listed,
                feed.iter().map(|e| (e.seq, e.id)).collect(),
                [
                    store.tracker_by_name("cases").expect("name"),
                    store.item_by_display_id("N-1").expect("display"),
                ],
            )
        };
        let whole = |n: usize| {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path()).expect("open");
            for writes in all.iter().take(n).cloned() {
                store.commit_batch(writes).expect("commit");
            }
            (visible(&store), data_keys(&store))
        };
        let (mut finished, mut unseen) = (0, 0);
        // Each write in turn is cut after every possible number of its steps (its unseen
        // inserts, its redo record, its other writes, the record's removal); the store is
        // then closed as a crash leaves it (everything applied so far on disk, no clean stop).
        for n in 0..all.len() {
            let (before, before_keys) = whole(n);
            let (after, after_keys) = whole(n + 1);
            for torn_after in 0.. {
                let dir = tempfile::tempdir().expect("tempdir");
                let mut store = Store::open(dir.path()).expect("open");
                for writes in all.iter().take(n).cloned() {
                    store.commit_batch(writes).expect("commit");
                }
                store.torn_after = Some(torn_after);
                if store.commit_batch(all[n].clone()).is_ok() {
                    // Past its last step: nothing left to cut.
                    break;
                }
                store.db.flush().expect("flush");
                drop(store);
                let store = Store::open(dir.path()).expect("reopen");
                assert!(store.db.get(META_REDO).expect("read").is_none());
                let seen = visible(&store);
                let keys = data_keys(&store);
                if seen == after {
                    assert_eq!(keys, after_keys, "write {n} cut after {torn_after} steps");
                    finished += 1;
                } else {
                    assert_eq!(seen, before, "write {n} cut after {torn_after} steps");
                    // What is stored besides is only the write's unseen inserts.
                    for (k, _) in keys.iter().filter(|kv| !before_keys.contains(kv)) {
                        assert!(
                            [P_SNAPSHOT, P_CHUNK].contains(&k[0]),
                            "write {n} cut after {torn_after} steps left {k:?}"
                        );
                    }
                    unseen += 1;
                }
            }
        }
        assert!(
            finished > 20 && unseen >= all.len(),
            "{finished} finished, {unseen} not"
        );
    }

    #[test]
    fn redo_records_decode_what_they_encode_and_nothing_else() {
        let mut ops = Ops::default();
        ops.insert(b"Sabc".to_vec(), vec![1, 2, 3]);
        ops.remove(b"Q1".to_vec());
        ops.insert(b"I".to_vec(), Vec::new());
        let bytes = ops.encode();
        assert_eq!(Ops::decode(&bytes), Some(ops));
        for cut in 0..bytes.len() {
            assert_eq!(Ops::decode(&bytes[..cut]), None, "a record cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Ops::decode(&longer), None, "trailing bytes");
        assert_eq!(Ops::decode(&[2, 0, 0, 0, 0]), None, "unknown version");
        assert_eq!(
            Ops::decode(&[1, 0, 0, 0, 1, 7, 0, 0, 0, 0]),
            None,
            "unknown kind"
        );
        assert_eq!(Ops::decode(&[1, 0, 0, 0, 0]), Some(Ops::default()));
    }

    #[test]
    fn counters_and_seq_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Uuid::now_v7();
        {
            let store = Store::open(dir.path()).expect("open");
            for _ in 0..3 {
                store
                    .commit(write(Uuid::now_v7(), t, DocData::Snapshot(vec![1]), false))
                    .expect("commit");
            }
            store.flush_for_stop().expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.live_items(), 3);
        assert_eq!(store.last_seq(), 3, "after a clean stop, numbering goes on");
        let (page, more) = store.items_of_tracker(t, None, 2, None).expect("list");
        assert!(more);
        let (rest, more) = store
            .items_of_tracker(t, Some(page[1]), 2, None)
            .expect("list");
        assert_eq!((rest.len(), more), (1, false));
    }

    #[tokio::test]
    async fn a_write_waits_for_its_flush_without_a_thread_and_hears_of_a_failed_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(Store::open(dir.path()).expect("open"));
        let t = Uuid::now_v7();
        let commit = |n: u8| {
            store
                .commit(write(Uuid::now_v7(), t, DocData::Snapshot(vec![n]), false))
                .expect("commit")
                .0
        };
        // Hold the flusher in its wait for a write under way.
        store
            .durable
            .group_wait_us
            .store(60_000_000, Ordering::Relaxed);
        store.announce_write();
        let ticket = commit(1);
        let flushes = store.flush_count();
        // Asking does not wait on this thread...
        assert!(!store.try_settle(ticket).expect("try"));
        // ...the wait is a task, woken when the flush covering the write ends.
        let waiter = tokio::spawn({
            let s = store.clone();
            async move { s.flush_done(ticket).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "durable before its flush");
        store.withdraw_write();
        waiter.await.expect("task").expect("durable");
        assert_eq!(store.flush_count(), flushes + 1);
        assert!(store.try_settle(ticket).expect("try"), "durable now");

        // A flush that failed for a write: its waiters get the error, and the flusher does
        // not try again until a write asks after it.
        let ticket = commit(2);
        {
            let mut st = store.durable.state.lock().expect("flush lock");
            st.last_error = Some(("disk full".into(), u64::MAX));
        }
        let flushes = store.flush_count();
        assert!(matches!(
            store.flush_done(ticket).await,
            Err(StoreError::FlushFailed(e)) if e == "disk full"
        ));
        assert!(matches!(
            store.wait_durable(ticket),
            Err(StoreError::FlushFailed(e)) if e == "disk full"
        ));
        assert_eq!(store.flush_count(), flushes, "not retried");
        // Room again (what a flush that succeeds records): the write goes through.
        store.durable.state.lock().expect("flush lock").last_error = None;
        store.flush_done(ticket).await.expect("durable");
        assert_eq!(store.flush_count(), flushes + 1);
    }

    #[test]
    fn the_feed_hands_out_only_durable_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let t = Uuid::now_v7();
        let (first, _) = store
            .commit(write(Uuid::now_v7(), t, DocData::Snapshot(vec![1]), false))
            .expect("commit");
        store.wait_durable(first).expect("durable");
        let flushes = store.flush_count();
        // Applied, not yet durable: a page that includes it makes it durable first.
        store
            .commit(write(Uuid::now_v7(), t, DocData::Snapshot(vec![2]), false))
            .expect("commit");
        let (page, last, _) = store.feed_since(0, 10, 1 << 20, 0).expect("feed");
        assert_eq!((page.len(), last), (2, 2));
        assert_eq!(
            store.flush_count(),
            flushes + 1,
            "the page waited for a flush"
        );
        // Nothing pending: no flush.
        store.feed_since(0, 10, 1 << 20, 0).expect("feed");
        assert_eq!(store.flush_count(), flushes + 1);
        // A store that cannot flush any more serves only what was durable.
        store
            .commit(write(Uuid::now_v7(), t, DocData::Snapshot(vec![3]), false))
            .expect("commit");
        store.durable.io_failed.store(true, Ordering::SeqCst);
        let (page, last, more) = store.feed_since(0, 10, 1 << 20, 0).expect("feed");
        assert_eq!((page.len(), last, more), (2, 2, false));
        let (page, last, _) = store.feed_since(2, 10, 1 << 20, 0).expect("feed");
        assert_eq!((page.len(), last), (0, 2));
    }

    #[test]
    fn recent_changes_answer_a_push_as_the_feed_would() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let t = Uuid::now_v7();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut from_peer = write(b, t, DocData::Chunk(b"theirs".to_vec()), false);
        from_peer.source = 7;
        let (ticket, _) = store
            .commit_batch(vec![
                write(a, t, DocData::Snapshot(b"s".to_vec()), false),
                from_peer,
            ])
            .expect("commit");
        // Not durable yet, and offered already: a push need not wait for the flush.
        let (docs, last, more) = store.feed_recent(0, 10, 1 << 20, 0, None).expect("covered");
        assert_eq!((docs.len(), last, more), (2, 2, false));
        store.wait_durable(ticket).expect("durable");
        let (docs, last, _) = store.feed_recent(0, 10, 1 << 20, 7, None).expect("covered");
        assert_eq!(
            (docs.len(), last),
            (1, 2),
            "the peer's own change is left out"
        );
        assert_eq!((docs[0].id, docs[0].data.as_slice()), (a, b"s".as_slice()));
        let (docs, _, _) = store.feed_since(0, 10, 1 << 20, 7).expect("feed");
        assert_eq!(docs.len(), 1, "the feed agrees");
        // A batch too large to keep: what came before it is no longer covered.
        let big: Vec<_> = (0..=RECENT_BATCH)
            .map(|_| write(Uuid::now_v7(), t, DocData::Snapshot(vec![1]), false))
            .collect();
        let (ticket, _) = store.commit_batch(big).expect("commit");
        store.wait_durable(ticket).expect("durable");
        assert!(store.feed_recent(2, 10, 1 << 20, 0, None).is_none());
        let last = store.last_seq();
        let (docs, l, _) = store
            .feed_recent(last, 10, 1 << 20, 0, None)
            .expect("covered");
        assert_eq!((docs.len(), l), (0, last));
        // A large page received from peer 7: its metadata alone says pushing it back to 7
        // would carry nothing.
        let page: Vec<_> = (0..=RECENT_BATCH)
            .map(|_| {
                let mut w = write(Uuid::now_v7(), t, DocData::Snapshot(vec![1]), false);
                w.source = 7;
                w
            })
            .collect();
        let (ticket, _) = store.commit_batch(page).expect("commit");
        store.wait_durable(ticket).expect("durable");
        let (docs, l, more) = store
            .feed_recent(last, 10, 1 << 20, 7, None)
            .expect("covered");
        assert_eq!((docs.len(), l, more), (0, store.last_seq(), false));
        assert!(store.feed_recent(last, 10, 1 << 20, 0, None).is_none());
        // A compaction: sled gets the snapshot, a push the change since the previous write.
        let last = store.last_seq();
        let mut compacted = write(a, t, DocData::Snapshot(b"s+c".to_vec()), false);
        compacted.increment = Some(b"c".to_vec());
        store.commit(compacted).expect("commit");
        let (docs, _, _) = store
            .feed_recent(last, 10, 1 << 20, 0, None)
            .expect("covered");
        assert_eq!(docs[0].data, b"c");
        let (docs, _, _) = store.feed_since(last, 10, 1 << 20, 0).expect("feed");
        assert_eq!(docs[0].data, b"s+c");
        // A store that cannot flush pushes only what is durable.
        let last = store.last_seq();
        store
            .commit(write(Uuid::now_v7(), t, DocData::Snapshot(vec![1]), false))
            .expect("commit");
        store.durable.io_failed.store(true, Ordering::SeqCst);
        let (docs, l, _) = store
            .feed_recent(last, 10, 1 << 20, 0, None)
            .expect("covered");
        assert_eq!((docs.len(), l), (0, last));
    }

    /// The highest sequence number a push could carry right now (see `Store::feed_recent`).
    fn push_reach(store: &Store) -> u64 {
        store.durable_seq() + SEQ_AHEAD
    }

    #[test]
    fn numbers_a_push_may_carry_are_never_reused_after_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Uuid::now_v7();
        let commit = |store: &Store| {
            store
                .commit(write(Uuid::now_v7(), t, DocData::Snapshot(vec![1]), false))
                .expect("commit")
                .0
        };
        let reach = {
            let store = Store::open(dir.path()).expect("open");
            let ticket = commit(&store);
            store.wait_durable(ticket).expect("durable");
            commit(&store);
            // Pushed before it is durable.
            let (docs, last, _) = store.feed_recent(0, 10, 1 << 20, 0, None).expect("covered");
            assert_eq!((docs.len(), last), (2, 2));
            push_reach(&store)
            // Dropped without a clean stop: a crash, as far as the next open can tell.
        };
        let reach = {
            let store = Store::open(dir.path()).expect("reopen");
            assert!(
                store.last_seq() >= reach,
                "resumes past what could have been pushed: {} < {reach}",
                store.last_seq()
            );
            // A flush with nothing new, then a crash: the floor keeps the gap's end durable.
            store.flush().expect("flush");
            commit(&store);
            push_reach(&store)
        };
        let store = Store::open(dir.path()).expect("reopen");
        assert!(store.last_seq() >= reach, "{} < {reach}", store.last_seq());
        let before = store.last_seq();
        store.flush_for_stop().expect("stop");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.last_seq(), before, "no gap after a clean stop");
    }
}
