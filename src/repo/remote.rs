//! Documents from peers: serving our change feed, and applying what a peer sends.
//!
//! Every byte from a peer is hostile: Automerge sees it only inside `catch_unwind`, a document
//! that fails to decode, changes kind or tracker, or panics Automerge is refused (and the peer
//! reported), and stamps beyond the allowed clock drift wait. One bad document never blocks
//! the others.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use automerge::{AutoCommit, ChangeHash};
use uuid::Uuid;

use super::{heads_of, Indexing, ItemEvent, Loaded, Repo, Result, Source};

/// Documents committed per sled batch when applying a peer's page.
pub const APPLY_BATCH: usize = 256;

use crate::hlc::Hlc;
use crate::item::{actor_for, ItemDoc};
use crate::peer::Ops;
use crate::schema::TrackerDoc;
use crate::store::{DocKind, DocWrite};

/// One document of a batch being applied: what merging it gave, and its store write.
struct Merged {
    /// Its place in the batch (and its slot guard's).
    n: usize,
    id: Uuid,
    seq: u64,
    kind: DocKind,
    applied: Applied,
    /// The store write, until it is handed to the commit.
    write: Option<DocWrite>,
    /// The item's tracker (for its event).
    tracker: Uuid,
    committed: bool,
    /// New to the store (not kept decoded afterwards).
    new_doc: bool,
    /// Merged as new without reading its stored metadata: the document as received, to merge
    /// again if the commit finds it stored after all.
    unread: Option<RemoteDoc>,
}

/// A document as it travels between peers.
#[derive(Clone, Debug)]
pub struct RemoteDoc {
    pub id: Uuid,
    pub kind: DocKind,
    pub tracker: Uuid,
    pub heads: Vec<[u8; 32]>,
    pub data: Vec<u8>,
    /// The sender's change sequence number for it (0 in fetch replies).
    pub seq: u64,
}

impl From<crate::store::FeedEntry> for RemoteDoc {
    fn from(e: crate::store::FeedEntry) -> Self {
        RemoteDoc {
            id: e.id,
            kind: e.meta.kind,
            tracker: e.meta.tracker,
            heads: e.meta.heads,
            data: e.data,
            seq: e.seq,
        }
    }
}

/// A page of the feed as sent to a peer: (documents, last sequence number, more follow).
fn remote_page(
    (entries, last, more): (Vec<crate::store::FeedEntry>, u64, bool),
) -> (Vec<RemoteDoc>, u64, bool) {
    (
        entries.into_iter().map(RemoteDoc::from).collect(),
        last,
        more,
    )
}

/// What validation learns of a merged document: its tracker, deleted flag, display id (new
/// items), highest stamp and name (trackers).
type Checked = (Uuid, bool, Option<String>, Option<Hlc>, Option<String>);

/// What became of one remote document.
#[derive(Debug, PartialEq)]
pub enum Applied {
    /// Merged and durable.
    Merged,
    /// Merged and durable, and the merge left a field with concurrent values it did not
    /// have before (a conflict, resolved by the tracker's policy and listed for review).
    MergedWithConflict,
    /// We already had it.
    Unchanged,
    /// The bytes did not carry everything (missing dependencies): fetch with our heads.
    Incomplete { have: Vec<[u8; 32]> },
    /// Stamped too far in the future; retried later.
    Deferred(String),
    /// Refused: not a valid document of the claimed kind. The sender misbehaved.
    Refused(String),
    /// Automerge panicked on these bytes. The sender must be disconnected.
    Panicked,
    /// A valid change the sender may not make here (its allowed operations): not applied,
    /// and not asked for again. Everything else still applies.
    NotAllowed(String),
}

impl Repo {
    /// Our documents changed after `since`, for a requester that holds them as of `base`
    /// (where its run of pages began; see [`crate::store::Store::feed_since_shared`]);
    /// `requester` (a peer tag) gets no documents it sent us itself.
    pub fn feed(
        &self,
        base: u64,
        since: u64,
        max_entries: usize,
        max_bytes: usize,
        requester: u64,
    ) -> Result<(Vec<RemoteDoc>, u64, bool)> {
        self.feed_shared(base, since, max_entries, max_bytes, requester, None)
    }

    /// [`Repo::feed`] limited to the trackers in `shared` (a peer's share policy), if given.
    pub fn feed_shared(
        &self,
        base: u64,
        since: u64,
        max_entries: usize,
        max_bytes: usize,
        requester: u64,
        shared: Option<&std::collections::HashSet<Uuid>>,
    ) -> Result<(Vec<RemoteDoc>, u64, bool)> {
        self.store
            .feed_since_shared(base, since, max_entries, max_bytes, requester, shared)
            .map(remote_page)
            .map_err(Into::into)
    }

    /// [`Repo::feed_shared`] from the changes written last, when they cover everything after
    /// `since` (see [`crate::store::Store::feed_recent`]).
    pub fn feed_recent(
        &self,
        since: u64,
        max_entries: usize,
        max_bytes: usize,
        requester: u64,
        shared: Option<&std::collections::HashSet<Uuid>>,
    ) -> Option<(Vec<RemoteDoc>, u64, bool)> {
        self.store
            .feed_recent(since, max_entries, max_bytes, requester, shared)
            .map(remote_page)
    }

    /// Everything of `id` a peer with heads `have` lacks.
    pub fn fetch(&self, id: Uuid, have: &[[u8; 32]]) -> Result<Option<RemoteDoc>> {
        let slot = self.slot(id);
        let mut guard = slot.lock();
        let Some(loaded) = self.ensure_loaded(id, &mut guard)? else {
            return Ok(None);
        };
        let Some(meta) = loaded.meta.clone() else {
            return Ok(None);
        };
        let have: Vec<ChangeHash> = have.iter().map(|h| ChangeHash(*h)).collect();
        // A peer without the document gets it whole and compact. A peer naming heads we do
        // not know holds changes we lack, so we cannot tell what it lacks (Automerge would
        // send everything): it gets our heads alone. Usually it holds those too (it is ahead
        // of us, as after reconciling with a peer that was offline); if not, it asks for the
        // whole document.
        let data = if have.is_empty() {
            loaded.doc.save()
        } else if have
            .iter()
            .any(|h| loaded.doc.get_change_by_hash(h).is_none())
        {
            Vec::new()
        } else {
            let data = loaded.doc.save_after(&have);
            if data.is_empty() {
                // The peer has everything of it already.
                return Ok(None);
            }
            data
        };
        Ok(Some(RemoteDoc {
            id,
            kind: meta.kind,
            tracker: meta.tracker,
            heads: meta.heads,
            data,
            seq: 0,
        }))
    }

    /// Merge documents from a peer. Each is validated and merged on its own (one bad
    /// document never blocks the others); the merged ones are committed in batches of up to
    /// [`APPLY_BATCH`], each durable before its documents are released to readers. `from` is the sender's peer tag.
    pub fn apply_remote(
        &self,
        docs: Vec<RemoteDoc>,
        from: u64,
    ) -> Result<Vec<(Uuid, u64, Applied)>> {
        self.apply_remote_allowed(docs, from, Ops::ALL)
    }

    /// [`Repo::apply_remote`], refusing item changes that create, update or delete when the
    /// sender may not ([`Applied::NotAllowed`]).
    pub fn apply_remote_allowed(
        &self,
        docs: Vec<RemoteDoc>,
        from: u64,
        ops: Ops,
    ) -> Result<Vec<(Uuid, u64, Applied)>> {
        if docs.is_empty() {
            // Registering as a writer would only make a concurrent flush wait for us.
            return Ok(Vec::new());
        }
        let _writing = self.store.begin_write();
        let mut out = Vec::with_capacity(docs.len());
        let mut last_ticket = None;
        let mut docs = docs.into_iter().peekable();
        while docs.peek().is_some() {
            // A batch holds each document once; its slots are locked in id order, so batches
            // applied concurrently (two peers' pages) cannot deadlock.
            let mut batch: Vec<RemoteDoc> = Vec::with_capacity(APPLY_BATCH);
            let mut ids = std::collections::HashSet::new();
            while let Some(d) = docs.next_if(|d| batch.len() < APPLY_BATCH && !ids.contains(&d.id))
            {
                ids.insert(d.id);
                batch.push(d);
            }
            batch.sort_by_key(|d| d.id);
            let slots: Vec<_> = batch.iter().map(|d| self.slot(d.id)).collect();
            let mut guards: Vec<_> = slots.iter().map(|s| s.lock()).collect();
            // Documents merged as new without reading their metadata (see `Repo::creating`)
            // are checked against the store by the commit; one found stored after all is
            // merged again, read as usual, and committed in a second round.
            let unread_ok = self.creating.load(Ordering::Relaxed);
            let mut merged = Vec::with_capacity(batch.len());
            for (n, doc) in batch.into_iter().enumerate() {
                if unread_ok && guards[n].is_none() {
                    if let Some((applied, write, tracker)) = self.create_unread(&doc, from, ops) {
                        merged.push(Merged {
                            n,
                            id: doc.id,
                            seq: doc.seq,
                            kind: doc.kind,
                            applied,
                            write: Some(write),
                            tracker,
                            committed: false,
                            new_doc: true,
                            unread: Some(doc),
                        });
                        continue;
                    }
                }
                merged.push(self.merge_read(n, doc, from, ops, &mut guards[n])?);
            }
            let mut round: Vec<usize> = (0..merged.len())
                .filter(|&i| merged[i].write.is_some())
                .collect();
            while !round.is_empty() {
                let absent: Vec<bool> = round.iter().map(|&i| merged[i].unread.is_some()).collect();
                let writes: Vec<DocWrite> = round
                    .iter()
                    .filter_map(|&i| merged[i].write.take())
                    .collect();
                match self.store.commit_batch_new(writes, &absent) {
                    Ok((ticket, metas, refused)) => {
                        last_ticket = Some(ticket);
                        let mut metas = metas.into_iter();
                        let mut again = Vec::with_capacity(refused.len());
                        for (k, &i) in round.iter().enumerate() {
                            if refused.contains(&k) {
                                again.push(i);
                                continue;
                            }
                            merged[i].committed = true;
                            let meta = metas.next();
                            if let Some(loaded) = guards[merged[i].n].as_mut() {
                                loaded.meta = meta;
                            }
                        }
                        round.clear();
                        for i in again {
                            let doc = merged[i].unread.take().expect("refused only if unread");
                            let n = merged[i].n;
                            merged[i] = self.merge_read(n, doc, from, ops, &mut guards[n])?;
                            if merged[i].write.is_some() {
                                round.push(i);
                            }
                        }
                    }
                    Err(e) => {
                        // Nothing of the batch was written: drop the merged copies, they
                        // reload from disk.
                        for &i in &round {
                            *guards[merged[i].n] = None;
                        }
                        return Err(e.into());
                    }
                }
            }
            // A document refused above was merged again as stored, so it turns the mode off.
            self.creating
                .store(merged.iter().all(|m| m.new_doc), Ordering::Relaxed);
            let mut trackers = Vec::new();
            let mut events = Vec::new();
            for m in merged {
                if m.committed {
                    match m.kind {
                        DocKind::Tracker => trackers.push(m.id),
                        DocKind::Item => {
                            // Documents new to this store are not kept decoded afterwards: an
                            // initial sync would otherwise fill the cache (and memory) with
                            // documents nobody is reading.
                            if m.new_doc {
                                *guards[m.n] = None;
                            }
                            events.push(ItemEvent {
                                item: m.id,
                                tracker: m.tracker,
                                source: Source::Remote,
                            });
                        }
                    }
                }
                out.push((m.id, m.seq, m.applied));
            }
            drop(guards);
            for id in trackers {
                self.refresh_tracker(id)?;
            }
            // Visible before it is durable: received documents are durable at their source,
            // and nothing built on them can outlive them (sled's log is one sequence, so our
            // next durable write covers them too). What must wait is what a crash would make
            // false: our feed offers them to peers only once durable (`Store::feed_page`),
            // and the caller moves its checkpoint on the sender only after this returns.
            for ev in events {
                let _ = self.events.send(ev);
            }
        }
        if let Some(ticket) = last_ticket {
            // One flush for the whole page, shared with concurrent writers.
            self.store.wait_durable(ticket)?;
            self.signal_change();
        }
        Ok(out)
    }

    /// Merge one document of a batch into its (locked) slot, reading its stored metadata
    /// first (once: the slot is locked, so it cannot change under us).
    fn merge_read(
        &self,
        n: usize,
        doc: RemoteDoc,
        from: u64,
        ops: Ops,
        guard: &mut Option<Loaded>,
    ) -> Result<Merged> {
        let (id, seq, kind) = (doc.id, doc.seq, doc.kind);
        let stored = self.store.doc_meta(id)?;
        let new_doc = guard.is_none() && stored.is_none();
        let (applied, write) = self.apply_one(doc, stored, from, ops, guard)?;
        let (write, tracker) = match write {
            Some((w, t)) => (Some(w), t),
            None => (None, Uuid::nil()),
        };
        Ok(Merged {
            n,
            id,
            seq,
            kind,
            applied,
            write,
            tracker,
            committed: false,
            new_doc,
            unread: None,
        })
    }

    /// [`Repo::try_create`] for a document whose stored metadata was not read: what
    /// [`Repo::apply_one`] would do for it if the store lacks it, when that is a write (the
    /// commit then checks the store lacks it). Anything else (refused, deferred, not a
    /// creation) is left to the merge, which reads the metadata.
    fn create_unread(
        &self,
        remote: &RemoteDoc,
        from: u64,
        ops: Ops,
    ) -> Option<(Applied, DocWrite, Uuid)> {
        if remote.kind != DocKind::Item
            || remote.data.is_empty()
            || super::guard::check(&remote.data).is_err()
        {
            return None;
        }
        match self.try_create(remote, from, ops)? {
            (applied, Some((write, tracker))) => Some((applied, write, tracker)),
            _ => None,
        }
    }

    /// Validate and merge one document into its (locked) slot, given its metadata in the
    /// store. Returns the store write to commit, with the item's tracker, when it merged.
    fn apply_one(
        &self,
        remote: RemoteDoc,
        stored: Option<crate::store::DocMeta>,
        from: u64,
        ops: Ops,
        guard: &mut Option<Loaded>,
    ) -> Result<(Applied, Option<(DocWrite, Uuid)>)> {
        let id = remote.id;
        if let Some(m) = &stored {
            if m.heads == remote.heads {
                return Ok((Applied::Unchanged, None));
            }
            if m.kind != remote.kind {
                return Ok((
                    Applied::Refused(format!("document {id} changes kind")),
                    None,
                ));
            }
        }
        if remote.data.is_empty() {
            // No changes: what we hold already covers the sender's heads (a fetch answered
            // for a document where we are ahead), or we lack something and must fetch it.
            let known = self.ensure_loaded(id, guard)?.is_some_and(|l| {
                catch_unwind(AssertUnwindSafe(|| {
                    remote
                        .heads
                        .iter()
                        .all(|h| l.doc.get_change_by_hash(&ChangeHash(*h)).is_some())
                }))
                .unwrap_or(false)
            });
            if known {
                return Ok((Applied::Unchanged, None));
            }
            let have = guard
                .as_ref()
                .and_then(|l| l.meta.as_ref())
                .map(|m| m.heads.clone())
                .unwrap_or_default();
            return Ok((Applied::Incomplete { have }, None));
        }
        if let Err(why) = super::guard::check(&remote.data) {
            return Ok((Applied::Refused(format!("document {id}: {why}")), None));
        }
        if guard.is_none() {
            let fast = match stored.as_ref() {
                Some(m) => self.try_append(&remote, m, from, ops),
                None => self.try_create(&remote, from, ops),
            };
            if let Some(done) = fast {
                return Ok(done);
            }
        }
        // A document the store lacks has nothing to load (and costs no second lookup).
        let existing =
            (stored.is_some() || guard.is_some()) && self.ensure_loaded(id, guard)?.is_some();
        let conflicts_before = guard.as_ref().map_or(0, |l| conflicted_keys(&l.doc));
        let before: Vec<[u8; 32]> = guard
            .as_ref()
            .and_then(|l| l.meta.as_ref())
            .map(|m| m.heads.clone())
            .unwrap_or_default();

        // Merge inside catch_unwind: automerge 0.12 panics on some crafted chunks.
        let merged = catch_unwind(AssertUnwindSafe(|| -> Result<AutoCommit, String> {
            match guard.take() {
                Some(mut loaded) => {
                    loaded
                        .doc
                        .load_incremental(&remote.data)
                        .map_err(|e| e.to_string())?;
                    Ok(*loaded.doc)
                }
                None => {
                    let mut doc = match AutoCommit::load(&remote.data) {
                        Ok(doc) => doc,
                        // Increments of a document new to us lack their dependencies and do
                        // not load on their own; queued in an empty document, they show as
                        // incomplete below (and the whole document is fetched).
                        Err(e) => {
                            let mut doc = AutoCommit::new();
                            doc.load_incremental(&remote.data)
                                .map_err(|_| e.to_string())?;
                            doc
                        }
                    };
                    doc.set_actor(actor_for(self.node));
                    Ok(doc)
                }
            }
        }));
        // From here the slot is empty; on any early return the document reloads from disk.
        let mut doc = match merged {
            Ok(Ok(doc)) => doc,
            // Bytes Automerge cannot parse are not a document (missing dependencies load fine
            // and are caught below).
            Ok(Err(e)) => return Ok((Applied::Refused(format!("document {id}: {e}")), None)),
            Err(_) => {
                tracing::warn!(doc = %id, "automerge panicked on a peer's bytes");
                return Ok((Applied::Panicked, None));
            }
        };
        // When we now hold exactly the sender's state (the usual case) the heads say so; only
        // otherwise look each of its heads up (which makes Automerge index every change).
        let same_as_sender = {
            let mut ours = heads_of(&mut doc);
            ours.sort_unstable();
            let mut theirs = remote.heads.clone();
            theirs.sort_unstable();
            ours == theirs
        };
        let complete = same_as_sender
            || catch_unwind(AssertUnwindSafe(|| {
                remote
                    .heads
                    .iter()
                    .all(|h| doc.get_change_by_hash(&ChangeHash(*h)).is_some())
            }))
            .unwrap_or(false);
        if !complete {
            return Ok((Applied::Incomplete { have: before }, None));
        }

        // Validate the merged document as what it claims to be.
        let check = catch_unwind(AssertUnwindSafe(|| -> Result<Checked, String> {
            match remote.kind {
                DocKind::Item => {
                    let idoc = ItemDoc::new(&mut doc);
                    let (view, max) = idoc
                        .view_by(id, |tracker| self.policy_of(tracker))
                        .map_err(|e| e.to_string())?;
                    let display = (!existing)
                        .then_some(view.display_id)
                        .filter(|d| !d.is_empty());
                    Ok((view.tracker, view.deleted, display, max, None))
                }
                DocKind::Tracker => {
                    let max = crate::register::max_hlc(&doc);
                    let t = TrackerDoc::new(&mut doc)
                        .view(id)
                        .map_err(|e| e.to_string())?;
                    Ok((id, false, None, max, Some(t.name)))
                }
            }
        }));
        let (tracker, deleted, display, max, name) = match check {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Ok((Applied::Refused(format!("document {id}: {e}")), None)),
            Err(_) => return Ok((Applied::Panicked, None)),
        };
        if remote.kind == DocKind::Item && tracker != remote.tracker {
            return Ok((
                Applied::Refused(format!(
                    "item {id} claims tracker {} but holds {tracker}",
                    remote.tracker
                )),
                None,
            ));
        }
        if let Some(waits) = self.observe_remote(id, max) {
            return Ok((waits, None));
        }
        if remote.kind == DocKind::Item && ops != Ops::ALL {
            // The slot is empty here: a refused merge is dropped and reloads from disk.
            let was_deleted = stored.as_ref().is_some_and(|m| m.deleted);
            let op = match (existing, deleted && !was_deleted) {
                (false, _) => (ops.create, "create"),
                (true, true) => (ops.delete, "delete"),
                (true, false) => (ops.update, "update"),
            };
            if !op.0 {
                return Ok((
                    Applied::NotAllowed(format!("item {id}: this peer may not {} items", op.1)),
                    None,
                ));
            }
        }
        let meta = if existing {
            let mut m = stored;
            if let Some(m) = m.as_mut() {
                m.heads = before;
            }
            m
        } else {
            None
        };
        // Holding exactly the sender's state, serving its pulls can skip this document.
        *guard = Some(Loaded {
            doc: Box::new(doc),
            meta,
            max_hlc: max,
        });
        let source = if same_as_sender { from } else { 0 };
        let received = (!existing).then_some(remote.data);
        let index = match remote.kind {
            DocKind::Item => Indexing {
                display_id: display,
                source,
                received,
                ..Indexing::item(tracker, deleted)
            },
            DocKind::Tracker => Indexing {
                // Index the name unless a local tracker already holds it (ids stay unique).
                tracker_name: name.filter(|n| {
                    self.store
                        .tracker_by_name(n)
                        .ok()
                        .flatten()
                        .is_none_or(|t| t == id)
                }),
                source,
                ..Indexing::tracker(id)
            },
        };
        let loaded = guard.as_mut().expect("merged document is in its slot");
        let write = self.prepare_write(id, loaded, index);
        let conflicted = conflicted_keys(&loaded.doc) > conflicts_before;
        let applied = if conflicted {
            Applied::MergedWithConflict
        } else {
            Applied::Merged
        };
        Ok((applied, Some((write, tracker))))
    }

    /// Move our clock past a received document's highest stamp; one beyond the drift bound
    /// is not applied yet ([`Applied::Deferred`]).
    fn observe_remote(&self, id: Uuid, max: Option<Hlc>) -> Option<Applied> {
        let m = max?;
        let now = self.clock.now_ms();
        let mut clock = self.hlc.lock().expect("hlc lock");
        let e = clock.observe(m, now).err()?;
        tracing::warn!(doc = %id, error = %e, "remote change waits for the local clock");
        Some(Applied::Deferred(e.to_string()))
    }

    /// The common case of an initial sync, without decoding the document: `remote` is an item
    /// new to us whose bytes are the one change that created it, as the origin stores a new
    /// item. Its view comes from the change's operations ([`crate::item::view_of_creation`]),
    /// and the bytes are stored as they came. Returns `None` when any of that does not hold,
    /// and the full merge decides.
    ///
    /// Validation matches the merge's: the chunk parses, its checksum holds, the change is a
    /// well-formed item (tracker, origin and creation stamp; every other value a register), it
    /// names the tracker the sender claims, its stamps are within the drift bound, and the
    /// sender's heads are this change.
    fn try_create(
        &self,
        remote: &RemoteDoc,
        from: u64,
        ops: Ops,
    ) -> Option<(Applied, Option<(DocWrite, Uuid)>)> {
        if remote.kind != DocKind::Item {
            return None;
        }
        // One change chunk, as the origin stores it or compressed; `Change::try_from` refuses
        // anything after it.
        let chunk = &remote.data[..];
        if !matches!(chunk.get(8), Some(1 | 2)) {
            return None;
        }
        // Inside catch_unwind, as every Automerge call on a peer's bytes.
        let parsed = catch_unwind(AssertUnwindSafe(|| {
            let change = automerge::Change::try_from(chunk).ok()?;
            let hash = change.hash();
            // The checksum Automerge checks when it loads the chunk (see `try_append`).
            if chunk.get(4..8) != Some(&hash.0[..4]) {
                return None;
            }
            let (view, max) =
                crate::item::view_of_creation(remote.id, &change, |t| self.policy_of(t))?;
            Some((hash, view, max))
        }))
        .ok()
        .flatten();
        let (hash, view, max) = parsed?;
        // Anything else (a document the sender holds more of, another tracker) the merge
        // fetches or refuses.
        if remote.heads != [hash.0] || view.tracker != remote.tracker {
            return None;
        }
        if let Some(waits) = self.observe_remote(remote.id, max) {
            return Some((waits, None));
        }
        if !ops.create {
            return Some((
                Applied::NotAllowed(format!(
                    "item {}: this peer may not create items",
                    remote.id
                )),
                None,
            ));
        }
        let write = DocWrite {
            id: remote.id,
            kind: DocKind::Item,
            tracker: view.tracker,
            deleted: view.deleted,
            heads: vec![hash.0],
            data: crate::store::DocData::Snapshot(remote.data.clone()),
            display_id: Some(view.display_id).filter(|d| !d.is_empty()),
            tracker_name: None,
            hlc: self.clock_last(),
            // Holding exactly the sender's state, serving its pulls can skip this document.
            source: from,
            increment: None,
        };
        Some((Applied::Merged, Some((write, view.tracker))))
    }

    /// The common case of a catch-up or live edit, without decoding the document: `remote`
    /// is a run of changes, the first made on exactly the heads we stored and each next on the
    /// one before (nothing concurrent), writing fields only, for an item we have stored and do
    /// not hold decoded. It is stored as one more chunk; the item's tracker, deleted flag and
    /// display id cannot change. Returns `None` when any of that does not hold, and the full
    /// merge decides.
    ///
    /// Why this is the same outcome as the merge: a change that depends on all our heads
    /// applies on top of everything we have, and so does each change of the run on its
    /// predecessor, so the document's new heads are the last change alone, and the fields
    /// written take the run's values (an honest change overwrites every value it saw, which is
    /// every value we hold). Validation matches the merge's: each chunk parses, its checksum
    /// holds, every value is a register, the stamps are within the drift bound, and the
    /// sender's heads are the run's last change.
    fn try_append(
        &self,
        remote: &RemoteDoc,
        stored: &crate::store::DocMeta,
        from: u64,
        ops: Ops,
    ) -> Option<(Applied, Option<(DocWrite, Uuid)>)> {
        if remote.kind != DocKind::Item
            || stored.kind != DocKind::Item
            || remote.tracker != stored.tracker
            || stored.chunks >= super::COMPACT_AFTER_CHUNKS
        {
            return None;
        }
        let chunks = change_chunks(&remote.data)?;
        // Inside catch_unwind, as every Automerge call on a peer's bytes.
        let parsed = catch_unwind(AssertUnwindSafe(|| {
            let mut heads = stored.heads.clone();
            heads.sort_unstable();
            let mut max: Option<Hlc> = None;
            let mut authors = std::collections::HashSet::new();
            for chunk in chunks {
                let change = automerge::Change::try_from(chunk).ok()?;
                let hash = change.hash();
                // Automerge checks this checksum when it loads the chunk; a chunk that failed
                // it later would be skipped on load while our heads claimed it. Two changes of
                // one author with one sequence number would be refused there too.
                if chunk.get(4..8) != Some(&hash.0[..4])
                    || !authors.insert((change.actor_id().clone(), change.seq()))
                {
                    return None;
                }
                let mut deps: Vec<[u8; 32]> = change.deps().iter().map(|h| h.0).collect();
                deps.sort_unstable();
                if deps != heads {
                    return None;
                }
                heads = vec![hash.0];
                for op in change.decode().operations {
                    let automerge::legacy::Key::Map(key) = &op.key else {
                        return None;
                    };
                    let value = match (&op.obj, &op.action, op.insert) {
                        (
                            automerge::legacy::ObjectId::Root,
                            automerge::legacy::OpType::Put(v),
                            false,
                        ) if crate::item::is_field_key(key) => v,
                        _ => return None,
                    };
                    let automerge::ScalarValue::Bytes(b) = value else {
                        return None;
                    };
                    let cell = crate::register::decode(b)?;
                    max = max.max(Some(cell.hlc));
                }
            }
            Some((heads[0], max))
        }))
        .ok()
        .flatten();
        let (hash, max) = parsed?;
        // The sender holds exactly what we will (else something is missing: the merge finds
        // it incomplete and fetches it).
        if remote.heads != [hash] {
            return None;
        }
        if let Some(waits) = self.observe_remote(remote.id, max) {
            return Some((waits, None));
        }
        if !ops.update {
            return Some((
                Applied::NotAllowed(format!(
                    "item {}: this peer may not update items",
                    remote.id
                )),
                None,
            ));
        }
        let write = DocWrite {
            id: remote.id,
            kind: DocKind::Item,
            tracker: stored.tracker,
            deleted: stored.deleted,
            heads: vec![hash],
            data: crate::store::DocData::Chunk(remote.data.clone()),
            display_id: None,
            tracker_name: None,
            hlc: self.clock_last(),
            // Holding exactly the sender's state, serving its pulls can skip this document.
            source: from,
            increment: None,
        };
        Some((Applied::Merged, Some((write, stored.tracker))))
    }
}

/// Split bytes into Automerge chunks if every one is an uncompressed change: magic bytes (4),
/// checksum (4), type (1 for a change), body length (LEB128), body.
fn change_chunks(data: &[u8]) -> Option<Vec<&[u8]>> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    const CHANGE_CHUNK: u8 = 1;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.get(..4)? != MAGIC || *rest.get(8)? != CHANGE_CHUNK {
            return None;
        }
        let (mut len, mut at, mut shift) = (0u64, 9usize, 0u32);
        loop {
            let b = *rest.get(at)?;
            at += 1;
            len |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 56 {
                return None;
            }
        }
        let end = at.checked_add(usize::try_from(len).ok()?)?;
        out.push(rest.get(..end)?);
        rest = &rest[end..];
    }
    (!out.is_empty()).then_some(out)
}

/// Keys of the root map holding concurrent values.
fn conflicted_keys(doc: &AutoCommit) -> usize {
    use automerge::ReadDoc;
    doc.map_range(automerge::ROOT, ..)
        .filter(|i| i.conflict)
        .count()
}

#[cfg(test)]
mod tests {
    //! The Automerge-facing wrapper against hostile documents: each is refused or deferred,
    //! and the store is left as it was.

    use std::sync::Arc;

    use automerge::transaction::Transactable;
    use serde_json::json;

    use super::*;
    use crate::hlc::{ManualClock, NodeId, DEFAULT_MAX_DRIFT_MS};
    use crate::model::{ConflictPolicy, FieldDef, FieldType};

    const NOW: u64 = 1_800_000_000_000;

    fn repo(dir: &std::path::Path, node: u8) -> Repo {
        let clock = Arc::new(ManualClock::new(NOW));
        Repo::open(
            dir,
            NodeId(Uuid::from_bytes([node; 16])),
            clock,
            DEFAULT_MAX_DRIFT_MS,
        )
        .expect("open")
    }

    fn text(name: &str) -> FieldDef {
        FieldDef {
            name: name.into(),
            ty: FieldType::Text,
            label: name.into(),
            required: false,
            options: vec![],
        }
    }

    /// A tracker and one item on a peer repo, as documents it would send.
    fn peer_docs(dir: &std::path::Path) -> (Repo, Vec<RemoteDoc>) {
        let peer = repo(dir, 9);
        peer.create_tracker("t", vec![text("a")], ConflictPolicy::Newer)
            .expect("tracker");
        peer.create_item("t", json!({"a": "x"}).as_object().cloned().expect("map"))
            .expect("item");
        let (docs, _, _) = peer.feed(0, 0, 100, 1 << 20, 0).expect("feed");
        (peer, docs)
    }

    fn item_of(docs: &[RemoteDoc]) -> RemoteDoc {
        docs.iter()
            .find(|d| d.kind == DocKind::Item)
            .cloned()
            .expect("an item")
    }

    /// A document with no bytes (a fetch answered where we are ahead) is not a refusal:
    /// nothing to do when we hold its heads, a fetch when we do not; and serving a fetch to
    /// a peer that has everything sends nothing.
    #[test]
    fn documents_without_bytes_are_unchanged_or_incomplete_never_refused() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (peer, docs) = peer_docs(a.path());
        let us = repo(b.path(), 1);
        let item = item_of(&docs);
        let empty = RemoteDoc {
            data: Vec::new(),
            ..item.clone()
        };
        let out = us.apply_remote(vec![empty.clone()], 7).expect("apply");
        assert_eq!(out[0].2, Applied::Incomplete { have: vec![] });
        us.apply_remote(docs.clone(), 7).expect("apply");
        // Now ours, with a local edit on top: we are ahead of the sender.
        us.update_item(
            &item.id.to_string(),
            json!({"a": "y"}).as_object().cloned().expect("map"),
        )
        .expect("edit");
        let out = us.apply_remote(vec![empty], 7).expect("apply");
        assert_eq!(out[0].2, Applied::Unchanged);
        let ours = us
            .store()
            .doc_meta(item.id)
            .expect("meta")
            .expect("doc")
            .heads;
        // The peer serving a fetch with our (newer) heads has nothing to send.
        let heads_we_have: Vec<[u8; 32]> = peer
            .store()
            .doc_meta(item.id)
            .expect("meta")
            .expect("doc")
            .heads;
        assert!(peer
            .fetch(item.id, &heads_we_have)
            .expect("fetch")
            .is_none());
        // Named heads it does not know (we are ahead): its own heads, no bytes.
        let ahead = peer
            .fetch(item.id, &ours)
            .expect("fetch")
            .expect("an answer");
        assert!(ahead.data.is_empty());
        assert_eq!(ahead.heads, heads_we_have);
        let whole = peer.fetch(item.id, &[]).expect("fetch").expect("whole");
        assert!(!whole.data.is_empty());
    }

    /// After a batch of new documents the next is merged as new without reading metadata;
    /// the commit refuses those the store holds after all, and they are merged as usual: a
    /// page sent again changes nothing, and a creation arriving after a later edit of the
    /// same item keeps the edit.
    #[test]
    fn documents_merged_unread_are_checked_against_the_store() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (peer, _) = peer_docs(a.path());
        for v in ["y", "z"] {
            peer.create_item("t", json!({ "a": v }).as_object().cloned().expect("map"))
                .expect("item");
        }
        let (docs, _, _) = peer.feed(0, 0, 100, 1 << 20, 0).expect("feed");
        let (trackers, items): (Vec<RemoteDoc>, Vec<RemoteDoc>) =
            docs.into_iter().partition(|d| d.kind == DocKind::Tracker);
        assert_eq!(items.len(), 3);
        let us = repo(b.path(), 1);
        us.apply_remote(trackers, 7).expect("tracker");
        let out = us.apply_remote(items.clone(), 7).expect("items");
        assert!(out.iter().all(|o| o.2 == Applied::Merged), "{out:?}");
        assert!(
            us.creating.load(Ordering::Relaxed),
            "a batch of new documents"
        );
        let (live, seq) = (us.store().live_items(), us.store().last_seq());

        // The same page again: every creation is refused by the commit, then unchanged.
        let out = us.apply_remote(items.clone(), 7).expect("again");
        assert!(out.iter().all(|o| o.2 == Applied::Unchanged), "{out:?}");
        assert_eq!(
            (us.store().live_items(), us.store().last_seq()),
            (live, seq)
        );
        assert!(!us.creating.load(Ordering::Relaxed));

        // The peer edits the first item; we take the edit, then a new item (so the next
        // batch is merged unread), then the first item's creation once more.
        let first = items[0].id.to_string();
        peer.update_item(
            &first,
            json!({"a": "edited"}).as_object().cloned().expect("map"),
        )
        .expect("edit");
        let fresh = peer
            .create_item("t", json!({"a": "w"}).as_object().cloned().expect("map"))
            .expect("item");
        let (page, _, _) = peer.feed(0, 0, 100, 1 << 20, 0).expect("feed");
        let edit = page
            .iter()
            .find(|d| d.id == items[0].id)
            .cloned()
            .expect("the edit");
        assert_eq!(
            us.apply_remote(vec![edit], 7).expect("edit")[0].2,
            Applied::Merged
        );
        let new_one = page
            .iter()
            .find(|d| d.id == fresh.id)
            .cloned()
            .expect("the new item");
        us.apply_remote(vec![new_one], 7).expect("new");
        assert!(us.creating.load(Ordering::Relaxed));
        // Stored unmerged, its creation would replace the edited document.
        us.apply_remote(vec![items[0].clone()], 7)
            .expect("old creation");
        assert!(!us.creating.load(Ordering::Relaxed));
        assert_eq!(us.item(&first).expect("view").fields["a"], json!("edited"));
        assert_eq!(
            us.item(&first).expect("view"),
            peer.item(&first).expect("peer")
        );
    }

    /// A new item sent as the change that created it (as it is, or compressed) is stored
    /// without decoding it (`try_create`), and ends exactly as a full merge of the same
    /// item (sent whole, as a fetch answers) leaves it: view, heads and index.
    #[test]
    fn a_new_item_read_from_its_change_ends_as_a_full_merge() {
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().expect("dir")).collect();
        let (peer, docs) = peer_docs(dirs[0].path());
        let long = "a long value that makes the change worth compressing ".repeat(8);
        peer.create_item("t", json!({ "a": long }).as_object().cloned().expect("map"))
            .expect("item");
        let (docs_now, _, _) = peer.feed(0, 0, 100, 1 << 20, 0).expect("feed");
        let items: Vec<RemoteDoc> = docs_now
            .into_iter()
            .filter(|d| d.kind == DocKind::Item)
            .collect();
        let item = item_of(&docs);
        let tracker: Vec<RemoteDoc> = docs
            .iter()
            .filter(|d| d.kind == DocKind::Tracker)
            .cloned()
            .collect();
        let (fast, full) = (repo(dirs[1].path(), 1), repo(dirs[2].path(), 2));
        for us in [&fast, &full] {
            us.apply_remote(tracker.clone(), 7).expect("tracker");
        }
        let mut chunk_types = Vec::new();
        for doc in &items {
            let change = automerge::Change::try_from(&doc.data[..]).expect("one change");
            assert!(
                change.deps().is_empty(),
                "a new item travels as the change that made it"
            );
            // Compressed on its own, the same change reads the same way.
            let mut compressed = change.clone();
            let compressed = RemoteDoc {
                data: compressed.bytes().into_owned(),
                ..doc.clone()
            };
            chunk_types.push((doc.data[8], compressed.data[8]));
            assert!(
                matches!(
                    fast.try_create(&compressed, 7, Ops::ALL),
                    Some((Applied::Merged, Some(_)))
                ),
                "read from the compressed change"
            );
            let whole = peer.fetch(doc.id, &[]).expect("fetch").expect("whole");
            assert!(
                automerge::Change::try_from(&whole.data[..]).is_err(),
                "a fetch sends a document"
            );
            assert!(
                matches!(
                    fast.try_create(doc, 7, Ops::ALL),
                    Some((Applied::Merged, Some(_)))
                ),
                "read from the change"
            );
            assert!(
                full.try_create(&whole, 7, Ops::ALL).is_none(),
                "a document is loaded"
            );
            for (us, bytes) in [(&fast, doc.clone()), (&full, whole)] {
                let out = us.apply_remote(vec![bytes], 7).expect("apply");
                assert_eq!(out[0].2, Applied::Merged);
            }
            let id = doc.id.to_string();
            let want = peer.item(&id).expect("peer's view");
            for us in [&fast, &full] {
                assert_eq!(us.item(&id).expect("view"), want);
                let meta = us.store().doc_meta(doc.id).expect("meta").expect("stored");
                assert_eq!(
                    (meta.heads, meta.deleted, meta.tracker),
                    (doc.heads.clone(), false, doc.tracker)
                );
                assert_eq!(
                    us.store()
                        .item_by_display_id(&want.display_id)
                        .expect("index"),
                    Some(doc.id)
                );
            }
        }
        chunk_types.sort_unstable();
        assert_eq!(
            chunk_types,
            [(1, 1), (1, 2)],
            "too small to compress, and compressed"
        );

        // What the merge refuses or holds back, the shortcut does too.
        let us = repo(dirs[3].path(), 3);
        us.apply_remote(tracker, 7).expect("tracker");
        let other_tracker = RemoteDoc {
            tracker: Uuid::from_bytes([5; 16]),
            ..item.clone()
        };
        let out = us.apply_remote(vec![other_tracker], 7).expect("apply");
        assert!(matches!(out[0].2, Applied::Refused(_)), "{out:?}");
        let no_create = Ops {
            create: false,
            ..Ops::ALL
        };
        let out = us
            .apply_remote_allowed(vec![item.clone()], 7, no_create)
            .expect("apply");
        assert!(matches!(out[0].2, Applied::NotAllowed(_)), "{out:?}");
        assert_eq!(us.store().live_items(), 0, "nothing stored");
    }

    #[test]
    fn honest_documents_apply_and_reapply_as_unchanged() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (_peer, docs) = peer_docs(a.path());
        let us = repo(b.path(), 1);
        let out = us.apply_remote(docs.clone(), 7).expect("apply");
        assert!(out.iter().all(|(_, _, r)| *r == Applied::Merged), "{out:?}");
        let out = us.apply_remote(docs, 7).expect("apply");
        assert!(
            out.iter().all(|(_, _, r)| *r == Applied::Unchanged),
            "{out:?}"
        );
        assert_eq!(us.store().live_items(), 1);
    }

    /// A peer's edit that follows exactly what we hold is stored as a chunk without decoding
    /// the document, and reads back (after a reopen too) as the full merge would give it;
    /// anything else (a delete, a concurrent edit, a bad checksum) still goes through the
    /// merge.
    #[test]
    fn a_change_on_top_of_our_heads_is_appended_without_decoding() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (peer, docs) = peer_docs(a.path());
        let us = repo(b.path(), 1);
        us.apply_remote(docs.clone(), 7).expect("apply");
        let id = item_of(&docs).id;
        let fields = |v: &str| json!({ "a": v }).as_object().cloned().expect("map");
        let mut since = peer.store().last_seq();
        let mut edit_on_peer = |f: &dyn Fn(&Repo)| {
            f(&peer);
            // As a peer that holds everything up to `since` pulls.
            let (docs, last, _) = peer.feed(since, since, 100, 1 << 20, 0).expect("feed");
            since = last;
            item_of(&docs)
        };
        let cached = |r: &Repo| r.doc_cache_usage().0;

        // An edit on top of our heads: appended; nothing decoded.
        let edit = edit_on_peer(&|p| {
            p.update_item(&id.to_string(), fields("y")).expect("edit");
        });
        let before = cached(&us);
        let out = us.apply_remote(vec![edit.clone()], 7).expect("apply");
        assert_eq!(out[0].2, Applied::Merged);
        assert_eq!(cached(&us), before, "the document was decoded");
        let meta = us.store().doc_meta(id).expect("meta").expect("doc");
        assert_eq!(
            (meta.heads.clone(), meta.chunks, meta.source),
            (edit.heads.clone(), 1, 7)
        );
        assert_eq!(
            us.item(&id.to_string()).expect("item").fields["a"],
            json!("y")
        );

        // The same chunk with its checksum broken: not appended, and our heads stay.
        let second = edit_on_peer(&|p| {
            p.update_item(&id.to_string(), fields("z")).expect("edit");
        });
        let mut broken = second.clone();
        broken.data[4] ^= 0xff;
        let out = us.apply_remote(vec![broken], 7).expect("apply");
        assert_ne!(out[0].2, Applied::Merged);
        assert_eq!(
            us.store().doc_meta(id).expect("meta").expect("doc").heads,
            edit.heads
        );
        // Whole, it applies (through the merge now: the item is decoded since the read).
        let out = us.apply_remote(vec![second.clone()], 7).expect("apply");
        assert_eq!(out[0].2, Applied::Merged);

        // A delete changes the item's index: merged in full, and the index follows.
        let delete = edit_on_peer(&|p| {
            p.delete_item(&id.to_string()).expect("delete");
        });
        us.close().expect("close");
        let us = repo(b.path(), 1);
        let before = cached(&us);
        let out = us.apply_remote(vec![delete], 7).expect("apply");
        assert_eq!(out[0].2, Applied::Merged);
        assert!(cached(&us) > before, "a delete is merged in full");
        assert!(us.item(&id.to_string()).expect("item").deleted);
        assert_eq!(us.store().live_items(), 0);

        // Concurrent edits of one field: not on top of our heads, so merged, with a conflict.
        us.restore_item(&id.to_string()).expect("restore");
        let theirs = edit_on_peer(&|p| {
            p.update_item(&id.to_string(), fields("theirs"))
                .expect("edit");
        });
        us.update_item(&id.to_string(), fields("ours"))
            .expect("edit");
        let out = us.apply_remote(vec![theirs], 7).expect("apply");
        assert_eq!(out[0].2, Applied::MergedWithConflict);

        // Appended chunks read back after a reopen: a third replica takes the whole feed, then
        // one edit on top of it.
        let c = tempfile::tempdir().expect("dir");
        let third = repo(c.path(), 2);
        let (docs, _, _) = peer.feed(0, 0, 100, 1 << 20, 0).expect("feed");
        third.apply_remote(docs, 7).expect("apply");
        // Two edits since: a run of two changes, each on the one before, appended as one.
        let run = edit_on_peer(&|p| {
            p.update_item(&id.to_string(), fields("u1")).expect("edit");
            p.update_item(&id.to_string(), fields("u2")).expect("edit");
        });
        assert_eq!(change_chunks(&run.data).map(|c| c.len()), Some(2));
        let before = cached(&third);
        let out = third.apply_remote(vec![run.clone()], 7).expect("apply");
        assert_eq!(out[0].2, Applied::Merged);
        assert_eq!(cached(&third), before, "the document was decoded");
        let meta = third.store().doc_meta(id).expect("meta").expect("doc");
        assert_eq!((meta.heads, meta.chunks), (run.heads, 1));
        let next = edit_on_peer(&|p| {
            p.update_item(&id.to_string(), fields("v")).expect("edit");
        });
        // A sender naming a head the bytes do not carry: incomplete, as the merge finds it.
        let mut more = next.clone();
        more.heads.push([7; 32]);
        let out = third.apply_remote(vec![more], 7).expect("apply");
        assert!(matches!(out[0].2, Applied::Incomplete { .. }), "{out:?}");
        let out = third.apply_remote(vec![next], 7).expect("apply");
        assert_eq!(out[0].2, Applied::Merged);
        third.close().expect("close");
        let third = repo(c.path(), 2);
        let item = third.item(&id.to_string()).expect("item");
        assert_eq!(
            (item.fields["a"].clone(), item.deleted),
            (json!("v"), false)
        );
    }

    #[test]
    fn only_whole_uncompressed_change_chunks_split() {
        let mut doc = AutoCommit::new();
        let mut change = |v: &str| {
            doc.put(automerge::ROOT, "k", v).expect("put");
            doc.commit();
            doc.get_last_local_change()
                .expect("a change")
                .raw_bytes()
                .to_vec()
        };
        let (one, two) = (change("a"), change("b"));
        let both = [one.clone(), two.clone()].concat();
        assert_eq!(change_chunks(&one), Some(vec![one.as_slice()]));
        assert_eq!(
            change_chunks(&both),
            Some(vec![one.as_slice(), two.as_slice()])
        );
        let mut document = one.clone();
        document[8] = 0;
        let mut endless = one[..9].to_vec();
        endless.extend_from_slice(&[0xff; 12]);
        for junk in [
            &[][..],
            &one[..one.len() - 1],
            &both[..both.len() - 1],
            &document,
            &endless,
            &one[1..],
        ] {
            assert_eq!(change_chunks(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn hostile_documents_are_refused_and_change_nothing() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (_peer, docs) = peer_docs(a.path());
        let us = repo(b.path(), 1);
        let item = item_of(&docs);

        let mut garbage = item.clone();
        garbage.data = vec![0x85, 0x6f, 0x4a, 0x83, 0xff, 0xff, 0xff, 0xff, 0x01];
        let mut empty = item.clone();
        empty.data.clear();
        let mut not_an_item = item.clone();
        not_an_item.data = {
            let mut d = AutoCommit::new();
            d.put(automerge::ROOT, "hello", "world").expect("put");
            d.save()
        };
        let mut wrong_tracker = item.clone();
        wrong_tracker.tracker = Uuid::from_bytes([3; 16]);
        let mut truncated = item.clone();
        truncated.data.truncate(truncated.data.len() / 2);
        let mut flipped = item.clone();
        let mid = flipped.data.len() / 2;
        flipped.data[mid] ^= 0xff;

        for (what, doc) in [
            ("garbage", garbage),
            ("empty", empty),
            ("not an item", not_an_item),
            ("wrong tracker", wrong_tracker),
            ("truncated", truncated),
            ("flipped byte", flipped),
        ] {
            let out = us.apply_remote(vec![doc], 7).expect("apply");
            assert!(
                matches!(
                    out[0].2,
                    Applied::Refused(_) | Applied::Panicked | Applied::Incomplete { .. }
                ),
                "{what}: {:?}",
                out[0].2
            );
            assert!(
                !matches!(out[0].2, Applied::Merged | Applied::Unchanged),
                "{what}"
            );
            assert_eq!(us.store().live_items(), 0, "{what} changed the store");
            assert_eq!(us.store().last_seq(), 0, "{what} wrote something");
        }
        // After all that, the honest document still applies.
        let out = us.apply_remote(docs, 7).expect("apply");
        assert!(out.iter().all(|(_, _, r)| *r == Applied::Merged), "{out:?}");
    }

    /// Found by `cargo fuzz run apply_document`: bytes that make automerge 0.12 (hexane) panic
    /// while loading, or grow its memory past 2 GB. Each must be refused before Automerge or,
    /// failing that, have its panic contained; nothing is written either way.
    #[test]
    fn fuzz_findings_are_refused_or_contained() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions/apply_document");
        let mut checked = 0;
        for e in std::fs::read_dir(dir).expect("regressions").flatten() {
            let data = std::fs::read(e.path()).expect("read");
            let b = tempfile::tempdir().expect("dir");
            let us = repo(b.path(), 1);
            let doc = crate::fuzzing::document_from_input(&data).expect("non-empty input");
            let out = us.apply_remote(vec![doc], 7).expect("apply returns");
            assert!(
                matches!(out[0].2, Applied::Refused(_) | Applied::Panicked),
                "{}: {:?}",
                e.path().display(),
                out[0].2
            );
            assert_eq!(us.store().last_seq(), 0);
            checked += 1;
        }
        assert!(checked >= 1);
    }

    #[test]
    fn stamps_beyond_the_drift_bound_wait_and_nothing_else_stalls() {
        let (a, b, c) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (_peer, honest) = peer_docs(a.path());
        // A peer whose clock is a day ahead.
        let ahead = Repo::open(
            c.path(),
            NodeId(Uuid::from_bytes([5; 16])),
            Arc::new(ManualClock::new(NOW + 86_400_000)),
            DEFAULT_MAX_DRIFT_MS,
        )
        .expect("open");
        ahead
            .create_tracker("t2", vec![text("a")], ConflictPolicy::Newer)
            .expect("tracker");
        ahead
            .create_item(
                "t2",
                json!({"a": "future"}).as_object().cloned().expect("map"),
            )
            .expect("item");
        let (future, _, _) = ahead.feed(0, 0, 100, 1 << 20, 0).expect("feed");

        let us = repo(b.path(), 1);
        let mut all = future.clone();
        all.extend(honest);
        let out = us.apply_remote(all, 7).expect("apply");
        let deferred = out
            .iter()
            .filter(|(_, _, r)| matches!(r, Applied::Deferred(_)))
            .count();
        let merged = out.iter().filter(|(_, _, r)| *r == Applied::Merged).count();
        assert_eq!((deferred, merged), (future.len(), 2), "{out:?}");
        assert!(
            us.clock_last().wall_ms < NOW + 86_400_000,
            "the clock did not jump ahead"
        );
        assert_eq!(us.store().live_items(), 1, "only the honest item");
    }
}
