//! The node's trackers and items: the one owner of their Automerge documents.
//!
//! Documents live in sled (via [`Store`]) and a cache of decoded documents bounded by their
//! estimated memory (`cache`). Each cached document sits behind its own mutex, and only that
//! single copy is ever written, so one actor id per node never produces two concurrent changes
//! with the same sequence number. An entry is evicted only when no caller holds it.
//!
//! Write path: lock the document, validate, stamp (HLC above everything visible), change, encode
//! the increment, commit it to the store with indexes and counters in one atomic write,
//! unlock, then wait for durability (group commit) before returning. If the store refuses the
//! write the cached copy is dropped so memory never runs ahead of disk.
//!
//! All methods block (Automerge and sled are synchronous); async callers use `spawn_blocking`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use automerge::AutoCommit;
use serde_json::{Map, Value as Json};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::hlc::{Clock, Hlc, HlcState, NodeId};
use crate::item::{actor_for, FieldConflict, HistoryEntry, ItemDoc, ItemError, ItemView};
use crate::model::{validate_name, validate_value, ConflictPolicy, FieldDef, Tracker, ValueError};
use crate::register::Cell;
use crate::schema::TrackerDoc;
use crate::store::{DocData, DocKind, DocMeta, DocWrite, Store, StoreError, Ticket};

mod cache;
mod guard;
mod remote;
use cache::{DocCache, Slot};
pub use remote::{Applied, RemoteDoc};

/// Memory for caches unless configured (`serve --cache-mb`): half for decoded documents
/// (`cache`), half for sled's page cache.
pub const DEFAULT_CACHE_BYTES: u64 = 128 * 1024 * 1024;
/// Incremental chunks after which a document is compacted into a new snapshot.
pub const COMPACT_AFTER_CHUNKS: u32 = 32;
/// Buffered change events per subscriber; a slower subscriber skips ahead (and is told so).
pub const EVENT_BUFFER: usize = 4096;
/// Largest page of items one list call returns.
pub const MAX_PAGE: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("no tracker {0:?}; list trackers with `trackersync tracker list`")]
    TrackerNotFound(String),
    #[error("no item {0:?}")]
    ItemNotFound(String),
    #[error("a tracker named {0:?} already exists")]
    DuplicateTracker(String),
    #[error("tracker {tracker:?} already has a field {field:?}")]
    DuplicateField { tracker: String, field: String },
    #[error(transparent)]
    Invalid(#[from] ValueError),
    #[error("{0}")]
    BadRequest(String),
    #[error("no conflicting value of field {field:?} stamped {hlc}; see the item's conflicts")]
    NoSuchLoser { field: String, hlc: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("document error: {0}")]
    Doc(#[from] ItemError),
}

impl From<automerge::AutomergeError> for RepoError {
    fn from(e: automerge::AutomergeError) -> Self {
        RepoError::Doc(ItemError::Automerge(e))
    }
}

pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// Where a change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Local,
    Remote,
}

/// One item change, as streamed to subscribers once durable.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ItemEvent {
    pub item: Uuid,
    pub tracker: Uuid,
    pub source: Source,
}

/// A local write applied but not yet durable, left by [`Repo::deferring`] for
/// [`Repo::complete`].
pub struct Deferred {
    ticket: Ticket,
    event: Option<ItemEvent>,
}

/// A write registered with the group commit before it reaches a blocking thread, so the
/// store's flusher waits for it as for a write under way (see
/// [`crate::store::Store::announce_write`]).
pub struct PendingWrite {
    repo: Arc<Repo>,
    adopted: bool,
}

impl PendingWrite {
    pub fn new(repo: &Arc<Repo>) -> PendingWrite {
        repo.store.announce_write();
        PendingWrite {
            repo: repo.clone(),
            adopted: false,
        }
    }

    /// On the thread that runs the write: the registration now ends with the guard.
    pub fn adopt(&mut self) -> crate::store::WriteGuard<'_> {
        self.adopted = true;
        self.repo.store.adopt_write()
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if !self.adopted {
            self.repo.store.withdraw_write();
        }
    }
}

thread_local! {
    /// Writes left to [`Repo::complete`], while [`Repo::deferring`] runs on this thread.
    static DEFERRED: std::cell::RefCell<Option<Vec<Deferred>>> = const { std::cell::RefCell::new(None) };
}

struct Loaded {
    /// Boxed: `AutoCommit` is about 4 KiB inline, and the cache keeps an `Option<Loaded>` for
    /// every entry, loaded or not.
    doc: Box<AutoCommit>,
    /// `None` until the document is first committed.
    meta: Option<DocMeta>,
    /// Highest stamp in the document: the floor for the next local write. Kept here so a
    /// write does not scan every register.
    max_hlc: Option<Hlc>,
}

/// How a document write is indexed by the store.
struct Indexing {
    kind: DocKind,
    tracker: Uuid,
    deleted: bool,
    display_id: Option<String>,
    tracker_name: Option<String>,
    /// Peer tag when the document now equals that peer's copy (see `DocMeta::source`).
    source: u64,
    /// For a new document received whole: its bytes as received (they loaded and hold every
    /// head), stored as the snapshot instead of encoding the document again.
    received: Option<Vec<u8>>,
}

impl Indexing {
    fn tracker(id: Uuid) -> Self {
        Indexing {
            kind: DocKind::Tracker,
            tracker: id,
            deleted: false,
            display_id: None,
            tracker_name: None,
            source: 0,
            received: None,
        }
    }

    fn item(tracker: Uuid, deleted: bool) -> Self {
        Indexing {
            kind: DocKind::Item,
            tracker,
            deleted,
            display_id: None,
            tracker_name: None,
            source: 0,
            received: None,
        }
    }
}

pub struct Repo {
    node: NodeId,
    store: Store,
    clock: Arc<dyn Clock>,
    hlc: Mutex<HlcState>,
    docs: DocCache,
    trackers: RwLock<HashMap<Uuid, Tracker>>,
    /// Serializes tracker creation so names stay unique on this node.
    tracker_names: Mutex<()>,
    events: broadcast::Sender<ItemEvent>,
    /// Last change sequence number made durable; the network notifies peers when it moves.
    changed: tokio::sync::watch::Sender<u64>,
    /// The last batch of received documents held only documents new to the store (as in an
    /// initial sync): the next one is merged as new without reading each document's
    /// metadata first, and its commit checks, under the commit lock, that the store lacks
    /// them (`Store::commit_batch_new`). sled 0.34 blocks every read while another thread
    /// commits a batch; this keeps a page's two appliers from waiting on each other's
    /// commits for lookups that find nothing.
    creating: std::sync::atomic::AtomicBool,
}

impl Repo {
    pub fn open(
        path: &Path,
        node: NodeId,
        clock: Arc<dyn Clock>,
        max_drift_ms: u64,
    ) -> Result<Repo> {
        Repo::open_with_cache(path, node, clock, max_drift_ms, DEFAULT_CACHE_BYTES)
    }

    /// Open with `cache_bytes` of memory for caches: half for decoded documents, half for the
    /// store's page cache.
    pub fn open_with_cache(
        path: &Path,
        node: NodeId,
        clock: Arc<dyn Clock>,
        max_drift_ms: u64,
        cache_bytes: u64,
    ) -> Result<Repo> {
        let store = Store::open_with_cache(path, cache_bytes / 2)?;
        let mut hlc = HlcState::new(node, max_drift_ms);
        hlc.witness(store.hlc_high_water());
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let repo = Repo {
            node,
            store,
            clock,
            hlc: Mutex::new(hlc),
            docs: DocCache::new((cache_bytes / 2) as usize),
            trackers: RwLock::new(HashMap::new()),
            tracker_names: Mutex::new(()),
            events,
            changed: tokio::sync::watch::Sender::new(0),
            creating: std::sync::atomic::AtomicBool::new(false),
        };
        for id in repo.store.tracker_ids()? {
            repo.refresh_tracker(id)?;
        }
        // The state record holds the clock's high-water mark only as of its last rewrite; the
        // document written last carries the latest stamp (every write is stamped above all it
        // saw), so witnessing it restores the clock exactly.
        if let Some(id) = repo.store.last_written()? {
            let slot = repo.slot(id);
            let mut guard = slot.lock();
            if let Some(loaded) = repo.ensure_loaded(id, &mut guard)? {
                if let Some(h) = loaded.max_hlc {
                    repo.hlc.lock().expect("hlc lock").witness(h);
                }
            }
        }
        Ok(repo)
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Flush and close the store, leaving it quick to open next time
    /// ([`Store::close_with_checkpoint`]).
    pub fn close(self) -> Result<()> {
        Ok(self.store.close_with_checkpoint()?)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ItemEvent> {
        self.events.subscribe()
    }

    /// Moves whenever a local write has been applied (its flush may still be under way: live
    /// pushes need not wait for it, see [`crate::store::Store::feed_recent`]) and whenever a
    /// page of peers' changes has become durable.
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A local write's last step before it is acknowledged: tell the network loop (live pushes
    /// go out now, while the flush runs), wait for durability, and tell it again (for what
    /// the pushes could not carry yet, see [`crate::store::Store::feed_recent`]).
    fn settle(&self, ticket: Ticket) -> Result<()> {
        self.settle_or_defer(ticket, None)
    }

    /// [`Repo::settle`], then the item event. Inside [`Repo::deferring`], a write not yet
    /// durable is left to [`Repo::complete`] instead of holding this thread until the store's
    /// flusher has made it so.
    fn settle_or_defer(&self, ticket: Ticket, event: Option<ItemEvent>) -> Result<()> {
        self.signal_change();
        let durable = if DEFERRED.with_borrow(Option::is_some) {
            self.store.try_settle(ticket)?
        } else {
            self.store.wait_durable(ticket)?;
            true
        };
        if !durable {
            DEFERRED.with_borrow_mut(|d| {
                if let Some(d) = d {
                    d.push(Deferred { ticket, event })
                }
            });
            return Ok(());
        }
        self.signal_change();
        if let Some(event) = event {
            // No subscribers is fine: events are for whoever listens.
            let _ = self.events.send(event);
        }
        Ok(())
    }

    /// Run the writes in `f` without waiting on this thread for their flush: what is left to
    /// wait for comes back as [`Deferred`], for [`Repo::complete`]. A blocking thread held
    /// through a flush is a thread no other write can use (and a write that cannot start
    /// misses that flush's group).
    pub fn deferring<T>(&self, f: impl FnOnce() -> Result<T>) -> (Result<T>, Vec<Deferred>) {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                DEFERRED.set(None);
            }
        }
        DEFERRED.set(Some(Vec::new()));
        let reset = Reset;
        let result = f();
        let deferred = DEFERRED.take().unwrap_or_default();
        drop(reset);
        (result, deferred)
    }

    /// Finish writes left by [`Repo::deferring`]: wait (without a thread) for the flush that
    /// covers each; then the same signals and events as a write that waited. The write is
    /// acknowledged only after this.
    pub async fn complete(self: &Arc<Self>, deferred: Vec<Deferred>) -> Result<()> {
        for d in deferred {
            self.store.flush_done(d.ticket).await?;
            self.signal_change();
            if let Some(event) = d.event {
                let _ = self.events.send(event);
            }
        }
        Ok(())
    }

    fn signal_change(&self) {
        self.changed.send_replace(self.store.last_seq());
    }

    /// The last stamp issued or observed.
    pub fn clock_last(&self) -> Hlc {
        self.hlc.lock().expect("hlc lock").last()
    }

    fn stamp(&self, floor: Option<Hlc>) -> Hlc {
        let now = self.clock.now_ms();
        let mut h = self.hlc.lock().expect("hlc lock");
        if let Some(f) = floor {
            h.witness(f);
        }
        h.tick(now)
    }

    // ---- document cache -------------------------------------------------------------------

    /// Estimated bytes held by cached documents, and how many are cached.
    pub fn doc_cache_usage(&self) -> (usize, usize) {
        (self.docs.bytes(), self.docs.len())
    }

    fn slot(&self, id: Uuid) -> Slot<'_> {
        self.docs.slot(id)
    }

    /// Decode a document from the store into `slot` if it is not there yet.
    fn ensure_loaded<'a>(
        &self,
        id: Uuid,
        slot: &'a mut Option<Loaded>,
    ) -> Result<Option<&'a mut Loaded>> {
        if slot.is_none() {
            let Some(bytes) = self.store.load_doc(id)? else {
                return Ok(None);
            };
            let mut doc = match load_whole(&bytes) {
                Some(doc) => doc,
                None => load_chunk_by_chunk(id, &bytes)?,
            };
            doc.set_actor(actor_for(self.node));
            let mut meta = bytes.meta;
            meta.heads = heads_of(&mut doc);
            let max_hlc = crate::register::max_hlc(&doc);
            *slot = Some(Loaded {
                doc: Box::new(doc),
                meta: Some(meta),
                max_hlc,
            });
        }
        Ok(slot.as_mut())
    }

    /// Commit the document's latest change to the store. On failure the cached copy is dropped.
    fn persist(&self, id: Uuid, slot: &mut Option<Loaded>, index: Indexing) -> Result<Ticket> {
        let loaded = slot
            .as_mut()
            .expect("persist is called on a loaded document");
        let write = self.prepare_write(id, loaded, index);
        match self.store.commit(write) {
            Ok((ticket, meta)) => {
                loaded.meta = Some(meta);
                Ok(ticket)
            }
            Err(e) => {
                *slot = None;
                Err(e.into())
            }
        }
    }

    /// The store write for a loaded document's latest change (not yet committed).
    fn prepare_write(&self, id: Uuid, loaded: &mut Loaded, mut index: Indexing) -> DocWrite {
        let (data, increment) = match &loaded.meta {
            Some(m) if m.chunks < COMPACT_AFTER_CHUNKS => (
                DocData::Chunk(loaded.doc.save_after(&hashes(&m.heads))),
                None,
            ),
            None if index.received.is_some() => (
                DocData::Snapshot(index.received.take().unwrap_or_default()),
                None,
            ),
            // A new document is stored as the change that made it: a peer receiving a new
            // item reads it from that change without loading a document (`Repo::try_create`),
            // the save costs half a compressed document's, and pages of such changes deflate
            // to less than half the bytes of compressed documents. Compaction saves a
            // compressed document. (The change compressed on its own was tried; see
            // benches/README.md, "New items as their change".)
            None => (DocData::Snapshot(loaded.doc.save_after(&[])), None),
            // A live push carries the change, not the whole document.
            Some(m) => (
                DocData::Snapshot(loaded.doc.save()),
                Some(loaded.doc.save_after(&hashes(&m.heads))),
            ),
        };
        let heads = heads_of(&mut loaded.doc);
        DocWrite {
            id,
            kind: index.kind,
            tracker: index.tracker,
            deleted: index.deleted,
            heads,
            data,
            display_id: index.display_id,
            tracker_name: index.tracker_name,
            hlc: self.clock_last(),
            source: index.source,
            increment,
        }
    }

    // ---- trackers ---------------------------------------------------------------------------

    fn refresh_tracker(&self, id: Uuid) -> Result<Tracker> {
        let slot = self.slot(id);
        let mut guard = slot.lock();
        let loaded = self
            .ensure_loaded(id, &mut guard)?
            .ok_or_else(|| RepoError::TrackerNotFound(id.to_string()))?;
        let view = TrackerDoc::new(&mut loaded.doc).view(id)?;
        self.trackers
            .write()
            .expect("trackers lock")
            .insert(id, view.clone());
        Ok(view)
    }

    pub fn trackers(&self) -> Vec<Tracker> {
        let mut all: Vec<Tracker> = self
            .trackers
            .read()
            .expect("trackers lock")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        all
    }

    /// A tracker by id or name.
    pub fn tracker(&self, reference: &str) -> Result<Tracker> {
        let id = match Uuid::parse_str(reference) {
            Ok(id) => Some(id),
            Err(_) => self.store.tracker_by_name(reference)?,
        };
        id.and_then(|id| {
            self.trackers
                .read()
                .expect("trackers lock")
                .get(&id)
                .cloned()
        })
        .ok_or_else(|| RepoError::TrackerNotFound(reference.to_string()))
    }

    fn policy_of(&self, tracker: Uuid) -> ConflictPolicy {
        self.trackers
            .read()
            .expect("trackers lock")
            .get(&tracker)
            .map(|t| t.conflict_policy)
            .unwrap_or_default()
    }

    pub fn create_tracker(
        &self,
        name: &str,
        fields: Vec<FieldDef>,
        policy: ConflictPolicy,
    ) -> Result<Tracker> {
        let _writing = self.store.begin_write();
        validate_name(name).map_err(RepoError::BadRequest)?;
        check_fields(&fields)?;
        let _names = self.tracker_names.lock().expect("names lock");
        if self.store.tracker_by_name(name)?.is_some() {
            return Err(RepoError::DuplicateTracker(name.to_string()));
        }
        let id = Uuid::now_v7();
        let hlc = self.stamp(None);
        let doc = TrackerDoc::create(self.node, hlc, name, &fields, policy)?;
        let slot = self.slot(id);
        let mut guard = slot.lock();
        *guard = Some(Loaded {
            doc: Box::new(doc),
            meta: None,
            max_hlc: Some(hlc),
        });
        let ticket = self.persist(
            id,
            &mut guard,
            Indexing {
                tracker_name: Some(name.to_string()),
                ..Indexing::tracker(id)
            },
        )?;
        drop(guard);
        self.settle(ticket)?;
        self.refresh_tracker(id)
    }

    fn modify_tracker(
        &self,
        reference: &str,
        f: impl FnOnce(&Tracker, &mut TrackerDoc<'_>, Hlc) -> Result<()>,
    ) -> Result<Tracker> {
        let _writing = self.store.begin_write();
        let tracker = self.tracker(reference)?;
        let id = tracker.id;
        let slot = self.slot(id);
        let mut guard = slot.lock();
        let loaded = self
            .ensure_loaded(id, &mut guard)?
            .ok_or_else(|| RepoError::TrackerNotFound(reference.to_string()))?;
        let hlc = self.stamp(loaded.max_hlc);
        loaded.max_hlc = Some(hlc);
        let mut tdoc = TrackerDoc::new(&mut loaded.doc);
        if let Err(e) = f(&tracker, &mut tdoc, hlc) {
            // A failed change may have left operations in the open transaction: reload.
            *guard = None;
            return Err(e);
        }
        let ticket = self.persist(id, &mut guard, Indexing::tracker(id))?;
        drop(guard);
        self.settle(ticket)?;
        self.refresh_tracker(id)
    }

    pub fn add_field(&self, reference: &str, field: FieldDef) -> Result<Tracker> {
        field.validate()?;
        if field.required {
            // Existing items have no value for it; a required new field would make them invalid.
            return Err(RepoError::BadRequest(format!(
                "field {:?}: a field added to an existing tracker cannot be required",
                field.name
            )));
        }
        self.modify_tracker(reference, |t, doc, hlc| {
            if t.field(&field.name).is_some() {
                return Err(RepoError::DuplicateField {
                    tracker: t.name.clone(),
                    field: field.name.clone(),
                });
            }
            if t.fields.len() >= crate::model::field_limits::MAX_FIELDS {
                return Err(RepoError::BadRequest(
                    "a tracker has at most 256 fields".into(),
                ));
            }
            Ok(doc.add_field(hlc, &field)?)
        })
    }

    pub fn set_policy(&self, reference: &str, policy: ConflictPolicy) -> Result<Tracker> {
        self.modify_tracker(reference, |_, doc, hlc| Ok(doc.set_policy(hlc, policy)?))
    }

    // ---- items ------------------------------------------------------------------------------

    pub fn create_item(&self, tracker_ref: &str, fields: Map<String, Json>) -> Result<ItemView> {
        let _writing = self.store.begin_write();
        let tracker = self.tracker(tracker_ref)?;
        let values = validate_fields(&tracker, fields, true)?;
        let id = Uuid::now_v7();
        let display = format!("{}-{}", self.node.short(), self.store.next_display_number());
        let hlc = self.stamp(None);
        let doc = ItemDoc::create(self.node, tracker.id, &display, hlc, &values)?;
        // A new item is exactly what was written: no need to read it back.
        let view = ItemView {
            id,
            display_id: display.clone(),
            tracker: tracker.id,
            fields: values
                .into_iter()
                .filter_map(|(k, v)| Some((k, v?)))
                .collect(),
            deleted: false,
            created: hlc,
            updated: hlc,
            origin: self.node,
        };
        let slot = self.slot(id);
        let mut guard = slot.lock();
        *guard = Some(Loaded {
            doc: Box::new(doc),
            meta: None,
            max_hlc: Some(hlc),
        });
        let ticket = self.persist(
            id,
            &mut guard,
            Indexing {
                display_id: Some(display),
                ..Indexing::item(tracker.id, false)
            },
        )?;
        drop(guard);
        self.finish(ticket, &view)?;
        Ok(view)
    }

    fn finish(&self, ticket: Ticket, view: &ItemView) -> Result<()> {
        let event = ItemEvent {
            item: view.id,
            tracker: view.tracker,
            source: Source::Local,
        };
        self.settle_or_defer(ticket, Some(event))
    }

    /// Read-only access to a loaded item.
    fn with_item<T>(
        &self,
        reference: &str,
        f: impl FnOnce(&mut ItemDoc<'_>, Uuid) -> Result<T>,
    ) -> Result<T> {
        let id = self.item_id(reference)?;
        let slot = self.slot(id);
        let mut guard = slot.lock();
        let loaded = self.ensure_item(id, reference, &mut guard)?;
        f(&mut ItemDoc::new(&mut loaded.doc), id)
    }

    /// The id `reference` names (an item id, or a display id that is in the index), not yet
    /// known to be an item's: [`Repo::ensure_item`] checks that from the document's metadata,
    /// which a cached document holds, so an edit of a cached item reads nothing from sled
    /// before its commit.
    fn item_id(&self, reference: &str) -> Result<Uuid> {
        match Uuid::parse_str(reference) {
            Ok(id) => Ok(id),
            Err(_) => self
                .store
                .item_by_display_id(reference)?
                .ok_or_else(|| RepoError::ItemNotFound(reference.to_string())),
        }
    }

    /// [`Repo::ensure_loaded`] for an item: not found if `id` is not stored or is not an
    /// item's (a tracker's id, say).
    fn ensure_item<'a>(
        &self,
        id: Uuid,
        reference: &str,
        slot: &'a mut Option<Loaded>,
    ) -> Result<&'a mut Loaded> {
        match self.ensure_loaded(id, slot)? {
            Some(loaded)
                if loaded
                    .meta
                    .as_ref()
                    .is_some_and(|m| m.kind == DocKind::Item) =>
            {
                Ok(loaded)
            }
            _ => Err(RepoError::ItemNotFound(reference.to_string())),
        }
    }

    pub fn item(&self, reference: &str) -> Result<ItemView> {
        self.with_item(reference, |doc, id| {
            let policy = self.policy_of(doc.tracker()?);
            Ok(doc.view(id, policy)?)
        })
    }

    /// Change an item: `f` receives the document, the tracker and a stamp.
    fn modify_item(
        &self,
        reference: &str,
        f: impl FnOnce(&mut ItemDoc<'_>, &Tracker, Hlc) -> Result<()>,
    ) -> Result<ItemView> {
        let _writing = self.store.begin_write();
        let id = self.item_id(reference)?;
        let slot = self.slot(id);
        let mut guard = slot.lock();
        let loaded = self.ensure_item(id, reference, &mut guard)?;
        let floor = loaded.max_hlc;
        let mut idoc = ItemDoc::new(&mut loaded.doc);
        let mut stamped = None;
        let result = (|| {
            let tracker_id = idoc.tracker()?;
            let tracker = self.tracker(&tracker_id.to_string())?;
            let hlc = self.stamp(floor);
            stamped = Some(hlc);
            f(&mut idoc, &tracker, hlc)?;
            Ok(idoc.view(id, tracker.conflict_policy)?)
        })();
        loaded.max_hlc = stamped.max(floor);
        let view = match result {
            Ok(v) => v,
            Err(e) => {
                *guard = None;
                return Err(e);
            }
        };
        let ticket = self.persist(id, &mut guard, Indexing::item(view.tracker, view.deleted))?;
        drop(guard);
        self.finish(ticket, &view)?;
        Ok(view)
    }

    pub fn update_item(&self, reference: &str, fields: Map<String, Json>) -> Result<ItemView> {
        if fields.is_empty() {
            return self.item(reference);
        }
        self.modify_item(reference, |doc, tracker, hlc| {
            let values = validate_fields(tracker, fields, false)?;
            Ok(doc.set_fields(hlc, &values)?)
        })
    }

    pub fn delete_item(&self, reference: &str) -> Result<ItemView> {
        self.modify_item(reference, |doc, _, hlc| Ok(doc.set_deleted(hlc, true)?))
    }

    pub fn restore_item(&self, reference: &str) -> Result<ItemView> {
        self.modify_item(reference, |doc, _, hlc| Ok(doc.set_deleted(hlc, false)?))
    }

    pub fn history(&self, reference: &str) -> Result<Vec<HistoryEntry>> {
        self.with_item(reference, |doc, _| Ok(doc.history()))
    }

    pub fn item_conflicts(&self, reference: &str) -> Result<Vec<FieldConflict>> {
        self.with_item(reference, |doc, _| {
            let policy = self.policy_of(doc.tracker()?);
            Ok(doc.conflicts(policy)?)
        })
    }

    /// Write a losing value of `field` again, as a new write that wins.
    pub fn restore_conflict(&self, reference: &str, field: &str, hlc: &str) -> Result<ItemView> {
        let wanted: Hlc = hlc
            .parse()
            .map_err(|e: crate::hlc::ParseHlcError| RepoError::BadRequest(e.to_string()))?;
        let loser: Cell = self
            .item_conflicts(reference)?
            .into_iter()
            .filter(|c| c.field == field)
            .flat_map(|c| c.losers)
            .find(|l| l.hlc == wanted)
            .ok_or_else(|| RepoError::NoSuchLoser {
                field: field.to_string(),
                hlc: hlc.to_string(),
            })?;
        if field == "_deleted" {
            let deleted = loser.value == Some(Json::Bool(true));
            return self.modify_item(reference, |doc, _, stamp| {
                Ok(doc.set_deleted(stamp, deleted)?)
            });
        }
        // Written as stored: it was valid when written, and restoring must not depend on later
        // schema changes.
        self.modify_item(reference, |doc, _, stamp| {
            Ok(doc.set_fields(stamp, &[(field.to_string(), loser.value.clone())])?)
        })
    }

    /// One page of a tracker's items in id (creation time) order.
    pub fn list_items(
        &self,
        tracker_ref: &str,
        after: Option<Uuid>,
        limit: usize,
        deleted: Option<bool>,
    ) -> Result<(Vec<ItemView>, Option<Uuid>)> {
        let tracker = self.tracker(tracker_ref)?;
        let limit = limit.clamp(1, MAX_PAGE);
        let (ids, more) = self
            .store
            .items_of_tracker(tracker.id, after, limit, deleted)?;
        let mut items = Vec::with_capacity(ids.len());
        for id in &ids {
            items.push(self.item(&id.to_string())?);
        }
        let next = if more { ids.last().copied() } else { None };
        Ok((items, next))
    }

    /// Every conflict across a tracker's live and deleted items.
    /// The conflict inbox: a tracker's fields with concurrent values the user has not
    /// reviewed yet (some losing value not acknowledged); `all` lists reviewed ones too.
    pub fn conflict_inbox(
        &self,
        tracker_ref: &str,
        all: bool,
    ) -> Result<Vec<(Uuid, FieldConflict)>> {
        let mut out = self.tracker_conflicts(tracker_ref)?;
        if !all {
            let mut acks: HashMap<Uuid, Vec<(String, String)>> = HashMap::new();
            for (item, _) in &out {
                if !acks.contains_key(item) {
                    acks.insert(*item, self.store.acks(*item)?);
                }
            }
            out.retain(|(item, c)| !reviewed(&acks[item], c));
        }
        Ok(out)
    }

    /// Mark the current losing values of an item's conflicts (one field, or all) reviewed.
    /// Returns how many fields' conflicts were acknowledged.
    pub fn ack_conflicts(&self, reference: &str, field: Option<&str>) -> Result<usize> {
        let id = self.item_id(reference)?;
        let conflicts: Vec<FieldConflict> = self
            .item_conflicts(reference)?
            .into_iter()
            .filter(|c| field.is_none_or(|f| c.field == f))
            .collect();
        if let Some(f) = field {
            if conflicts.is_empty() {
                return Err(RepoError::BadRequest(format!(
                    "field {f:?} of this item has no conflict to acknowledge"
                )));
            }
        }
        self.ack(id, &conflicts)?;
        Ok(conflicts.len())
    }

    /// Acknowledge every conflict in a tracker's inbox. Returns how many.
    pub fn ack_tracker_conflicts(&self, tracker_ref: &str) -> Result<usize> {
        let inbox = self.conflict_inbox(tracker_ref, false)?;
        let mut by_item: HashMap<Uuid, Vec<FieldConflict>> = HashMap::new();
        for (item, c) in inbox {
            by_item.entry(item).or_default().push(c);
        }
        let mut n = 0;
        for (item, conflicts) in by_item {
            n += conflicts.len();
            self.ack(item, &conflicts)?;
        }
        Ok(n)
    }

    fn ack(&self, item: Uuid, conflicts: &[FieldConflict]) -> Result<()> {
        let mut acks = self.store.acks(item)?;
        for c in conflicts {
            for l in &c.losers {
                let pair = (c.field.clone(), l.hlc.to_string());
                if !acks.contains(&pair) {
                    acks.push(pair);
                }
            }
        }
        self.store.set_acks(item, &acks)?;
        Ok(())
    }

    pub fn tracker_conflicts(&self, tracker_ref: &str) -> Result<Vec<(Uuid, FieldConflict)>> {
        let tracker = self.tracker(tracker_ref)?;
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let (ids, more) = self
                .store
                .items_of_tracker(tracker.id, after, MAX_PAGE, None)?;
            for id in &ids {
                for c in self.item_conflicts(&id.to_string())? {
                    out.push((*id, c));
                }
            }
            if !more {
                return Ok(out);
            }
            after = ids.last().copied();
        }
    }
}

/// Whether every losing value of a conflict has been acknowledged.
fn reviewed(acks: &[(String, String)], c: &FieldConflict) -> bool {
    c.losers.iter().all(|l| {
        acks.iter()
            .any(|(f, h)| *f == c.field && *h == l.hlc.to_string())
    })
}

fn check_fields(fields: &[FieldDef]) -> Result<()> {
    if fields.len() > crate::model::field_limits::MAX_FIELDS {
        return Err(RepoError::BadRequest(
            "a tracker has at most 256 fields".into(),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for f in fields {
        f.validate()?;
        if !names.insert(&f.name) {
            return Err(RepoError::BadRequest(format!(
                "field {:?} is defined twice",
                f.name
            )));
        }
    }
    Ok(())
}

/// Validate user-supplied values against the schema; `null` clears. On create, required fields
/// must be present and not null.
fn validate_fields(
    tracker: &Tracker,
    fields: Map<String, Json>,
    create: bool,
) -> Result<Vec<(String, Option<Json>)>> {
    let mut out = Vec::with_capacity(fields.len());
    for (name, value) in fields {
        let def = tracker
            .field(&name)
            .ok_or_else(|| ValueError::UnknownField(name.clone()))?;
        let value = match value {
            Json::Null if def.required => return Err(ValueError::Missing(name).into()),
            Json::Null => None,
            v => Some(validate_value(def, &v)?),
        };
        out.push((name, value));
    }
    if create {
        for def in tracker.fields.iter().filter(|d| d.required) {
            if !out.iter().any(|(n, v)| *n == def.name && v.is_some()) {
                return Err(ValueError::Missing(def.name.clone()).into());
            }
        }
    }
    Ok(out)
}

/// A stored document read in one `load` of its snapshot and chunks together: the changes are
/// applied as one batch, about 8 µs less than a `load_incremental` per chunk for a record with
/// one chunk. `None` when there are no chunks, or any of it does not decode, or Automerge
/// panics on it: [`load_chunk_by_chunk`] then keeps what it can.
fn load_whole(bytes: &crate::store::DocBytes) -> Option<AutoCommit> {
    if bytes.chunks.is_empty() {
        return None;
    }
    let len = bytes.snapshot.len() + bytes.chunks.iter().map(Vec::len).sum::<usize>();
    let mut all = Vec::with_capacity(len);
    all.extend_from_slice(&bytes.snapshot);
    for chunk in &bytes.chunks {
        all.extend_from_slice(chunk);
    }
    std::panic::catch_unwind(|| AutoCommit::load(&all).ok())
        .ok()
        .flatten()
}

/// A stored document read from its snapshot, then chunk by chunk. A chunk that does not
/// decode was never acknowledged (acks follow a flush of the whole batch); the good prefix is
/// kept rather than losing the document. A peer's change appended without a merge
/// (`Repo::try_append`) is applied here first, so a panic in Automerge is contained too.
fn load_chunk_by_chunk(id: Uuid, bytes: &crate::store::DocBytes) -> Result<AutoCommit> {
    let mut doc = AutoCommit::load(&bytes.snapshot)?;
    for (n, chunk) in bytes.chunks.iter().enumerate() {
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            doc.load_incremental(chunk).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|_| Err("automerge panicked".into()));
        if let Err(e) = applied {
            tracing::warn!(item = %id, chunk = n, error = %e, "ignoring undecodable chunk");
            break;
        }
    }
    Ok(doc)
}

fn heads_of(doc: &mut AutoCommit) -> Vec<[u8; 32]> {
    doc.get_heads().into_iter().map(|h| h.0).collect()
}

fn hashes(heads: &[[u8; 32]]) -> Vec<automerge::ChangeHash> {
    heads.iter().map(|h| automerge::ChangeHash(*h)).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::hlc::{ManualClock, DEFAULT_MAX_DRIFT_MS};
    use crate::model::FieldType;

    /// A repo in `dir` with one tracker, `t`, of one text field, `a`.
    fn repo_with_tracker(dir: &Path) -> Repo {
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let repo = Repo::open(dir, NodeId::random(), clock, DEFAULT_MAX_DRIFT_MS).expect("open");
        let field = FieldDef {
            name: "a".into(),
            ty: FieldType::Text,
            label: "a".into(),
            required: false,
            options: vec![],
        };
        repo.create_tracker("t", vec![field], ConflictPolicy::Newer)
            .expect("tracker");
        repo
    }

    /// Concurrent API-style writes (applied on blocking threads, waited for as tasks): each is
    /// durable when acknowledged and announced exactly once, whichever thread flushed it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_writes_are_durable_and_announced_once_when_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Arc::new(repo_with_tracker(dir.path()));
        let mut events = repo.subscribe();
        let (writers, each) = (8, 25);
        let mut tasks = Vec::new();
        for w in 0..writers {
            let repo = repo.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..each {
                    let r = repo.clone();
                    let fields = json!({"a": format!("{w}-{i}")});
                    let (view, deferred) = tokio::task::spawn_blocking(move || {
                        r.deferring(|| {
                            let view =
                                r.create_item("t", fields.as_object().cloned().expect("map"))?;
                            r.update_item(
                                &view.id.to_string(),
                                json!({"a": "edited"}).as_object().cloned().expect("map"),
                            )
                        })
                    })
                    .await
                    .expect("task");
                    let view = view.expect("write");
                    repo.complete(deferred).await.expect("durable");
                    let seq = repo
                        .store()
                        .doc_meta(view.id)
                        .expect("meta")
                        .expect("stored")
                        .seq;
                    assert!(
                        seq <= repo.store().durable_seq(),
                        "acknowledged write {seq} is durable (durable up to {})",
                        repo.store().durable_seq()
                    );
                    ids.push(view.id);
                }
                ids
            }));
        }
        let mut written = std::collections::HashMap::new();
        for t in tasks {
            for id in t.await.expect("writer") {
                written.insert(id, 0);
            }
        }
        assert_eq!(written.len(), writers * each);
        while let Ok(e) = events.try_recv() {
            *written
                .get_mut(&e.item)
                .expect("an event for a written item") += 1;
        }
        assert!(
            written.values().all(|&n| n == 2),
            "one event per write (create and edit) for every item"
        );
    }

    /// A stored document decodes to the same document in one `load` as chunk by chunk, and a
    /// chunk that does not decode (garbage, or a torn tail) falls back to the chunk-by-chunk
    /// read, which keeps everything before it.
    #[test]
    fn a_document_reads_the_same_whole_as_chunk_by_chunk_and_a_bad_chunk_keeps_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repo_with_tracker(dir.path());
        let fields = |v: &str| json!({ "a": v }).as_object().cloned().expect("map");
        let id = repo.create_item("t", fields("0")).expect("create").id;
        for v in ["1", "2", "3"] {
            repo.update_item(&id.to_string(), fields(v)).expect("edit");
        }
        let bytes = repo.store().load_doc(id).expect("load").expect("stored");
        assert_eq!(bytes.chunks.len(), 3, "one chunk per edit");
        let mut whole = load_whole(&bytes).expect("decodes whole");
        let mut stepwise = load_chunk_by_chunk(id, &bytes).expect("decodes chunk by chunk");
        assert_eq!(whole.get_heads(), stepwise.get_heads());
        assert_eq!(whole.save(), stepwise.save());
        let view = ItemDoc::new(&mut whole)
            .view(id, ConflictPolicy::Newer)
            .expect("an item");
        assert_eq!(view.fields.get("a"), Some(&json!("3")));

        let heads = whole.get_heads();
        let good_prefix = |bad: &crate::store::DocBytes| {
            let mut doc = load_chunk_by_chunk(id, bad).expect("the snapshot decodes");
            assert_eq!(doc.get_heads(), heads, "everything before the bad chunk");
        };
        let torn = {
            let last = bytes.chunks.last().expect("a chunk");
            let mut b = repo.store().load_doc(id).expect("load").expect("stored");
            b.chunks.push(last[..last.len() - 3].to_vec());
            b
        };
        let garbage = {
            let mut b = repo.store().load_doc(id).expect("load").expect("stored");
            b.chunks.push(vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 5]);
            b
        };
        for bad in [&torn, &garbage] {
            assert!(
                load_whole(bad).is_none(),
                "a bad chunk fails the one-pass read"
            );
            good_prefix(bad);
        }
    }
}
