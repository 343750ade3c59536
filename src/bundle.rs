//! Bundles: sync without a network (SPEC section 3, "file sync"). A bundle is a slice of a
//! node's change feed written to one file (format in `proto/trackersync/v1/bundle.proto`):
//! tracker schemas and items, whole or only what changed after a checkpoint. Importing one
//! applies it exactly as a network pull would (same validation, merge rules, allowed
//! operations and share policy) and records, for the exporting node, the checkpoint the
//! bundle reached, so the next network sync or bundle does not carry it again.
//!
//! Reading is all-or-nothing: the checksum, the header's counts and every entry are verified
//! before the first document is applied, so a truncated or tampered file changes nothing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use libp2p::PeerId;
use prost::Message;
use serde::Serialize;
use uuid::Uuid;

use crate::net::wire::{self, pb};
use crate::peer::{Ops, PeerConfig};
use crate::repo::{Applied, RemoteDoc};
use crate::repo::{Repo, RepoError};
use crate::store::DocKind;

pub const MAGIC: &[u8; 8] = b"TSBUNDLE";
pub const FORMAT_VERSION: u32 = 1;
/// Largest frame a reader accepts (a writer stays well under it).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Largest header a reader accepts.
const MAX_HEADER_BYTES: usize = 4 * 1024 * 1024;
/// Feed entries per frame, and bytes after which a frame is closed.
const FRAME_ENTRIES: usize = 2000;
const FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Items applied per step (two threads), between progress updates.
const IMPORT_STEP: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a trackersync bundle (the file does not start with TSBUNDLE)")]
    NotABundle,
    #[error(
        "bundle format version {0} is not supported (this trackersync reads version {FORMAT_VERSION}); upgrade trackersync"
    )]
    Version(u32),
    #[error("the bundle is truncated: {0}; copy the whole file again")]
    Truncated(String),
    #[error("the bundle is damaged or was changed after export (checksum mismatch); copy it again from the exporting node")]
    Checksum,
    #[error("the bundle is malformed: {0}")]
    Malformed(String),
    /// A request the exporter cannot satisfy (unknown peer, conflicting options).
    #[error("{0}")]
    Request(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl From<crate::store::StoreError> for BundleError {
    fn from(e: crate::store::StoreError) -> Self {
        BundleError::Repo(e.into())
    }
}

type Result<T, E = BundleError> = std::result::Result<T, E>;

/// What to export.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Only these trackers (names or ids); empty = all.
    pub trackers: Vec<String>,
    /// Only what changed after this checkpoint (a `last_seq` of an earlier bundle).
    pub since: Option<u64>,
    /// Made for this configured peer (id or name): its share policy applies, what it sent us
    /// is left out, and it starts where the peer is known to be on our feed.
    pub for_peer: Option<String>,
}

/// How far an export or import has come, for progress displays.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

impl Progress {
    fn start(&self, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

/// A bundle's header, as a person reads it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HeaderInfo {
    pub format_version: u32,
    pub node: String,
    pub peer_id: String,
    pub since: u64,
    pub last_seq: u64,
    pub created: String,
    pub trackers: Vec<String>,
    pub tracker_docs: u64,
    pub item_docs: u64,
    pub for_peer: Option<String>,
    pub filtered: bool,
}

/// A verified bundle, ready to apply.
pub struct Bundle {
    pub header: pb::BundleHeader,
    pub peer: PeerId,
    pub incarnation: Uuid,
    pub docs: Vec<RemoteDoc>,
}

impl Bundle {
    pub fn info(&self) -> HeaderInfo {
        header_info(&self.header)
    }
}

fn header_info(h: &pb::BundleHeader) -> HeaderInfo {
    HeaderInfo {
        format_version: h.format_version,
        node: Uuid::from_slice(&h.node)
            .map(|u| u.to_string())
            .unwrap_or_default(),
        peer_id: PeerId::from_bytes(&h.peer_id)
            .map(|p| p.to_string())
            .unwrap_or_default(),
        since: h.since,
        last_seq: h.last_seq,
        created: chrono::DateTime::from_timestamp_millis(h.created_ms as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default(),
        trackers: h.trackers.iter().map(|t| t.name.clone()).collect(),
        tracker_docs: h.tracker_docs,
        item_docs: h.item_docs,
        for_peer: (!h.for_peer.is_empty())
            .then(|| PeerId::from_bytes(&h.for_peer).ok().map(|p| p.to_string()))
            .flatten(),
        filtered: h.filtered,
    }
}

/// What an export wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExportSummary {
    #[serde(flatten)]
    pub header: HeaderInfo,
    pub bytes: u64,
    pub duration_ms: u64,
}

/// Configured peers, from the store.
fn peer_configs(repo: &Repo) -> Result<Vec<PeerConfig>> {
    Ok(repo
        .store()
        .peers()?
        .iter()
        .filter_map(|b| serde_json::from_slice(b).ok())
        .collect())
}

/// A configured peer by PeerId or name.
fn find_peer(repo: &Repo, reference: &str) -> Result<PeerConfig> {
    peer_configs(repo)?
        .into_iter()
        .find(|p| p.peer_id == reference || p.name.as_deref() == Some(reference))
        .ok_or_else(|| {
            BundleError::Request(format!(
                "no peer {reference:?}: add it first with `trackersync peer add`"
            ))
        })
}

/// Write a bundle of this node's store.
pub fn export(
    repo: &Repo,
    me: &PeerId,
    opts: &ExportOptions,
    progress: &Progress,
) -> Result<(Vec<u8>, ExportSummary)> {
    let started = Instant::now();
    let store = repo.store();
    if opts.since.is_some() && opts.for_peer.is_some() {
        return Err(BundleError::Request(
            "use either --since or --for-peer: a bundle for a peer starts where that peer is"
                .into(),
        ));
    }
    let mut wanted: Option<HashSet<Uuid>> = None;
    if !opts.trackers.is_empty() {
        let mut set = HashSet::new();
        for t in &opts.trackers {
            set.insert(repo.tracker(t)?.id);
        }
        wanted = Some(set);
    }
    let ours = store.incarnation();
    let (incarnation, since, skip, for_peer) = match &opts.for_peer {
        None => (ours, opts.since.unwrap_or(0), 0, Vec::new()),
        Some(reference) => {
            let config = find_peer(repo, reference)?;
            let peer: PeerId = config
                .peer_id
                .parse()
                .map_err(|_| BundleError::Request(format!("peer {reference:?} has a bad id")))?;
            let served = config.served_incarnation(ours);
            let since = match store.peer_has(&peer.to_bytes())? {
                Some((inc, seq)) if inc == served => seq,
                _ => 0,
            };
            if let Some(policy) = config.shared(&repo.trackers()) {
                wanted = Some(match wanted {
                    None => policy,
                    Some(w) => w.intersection(&policy).copied().collect(),
                });
            }
            let skip = crate::store::peer_tag(&peer.to_bytes());
            (served, since, skip, peer.to_bytes())
        }
    };
    progress.start(store.last_seq().saturating_sub(since));

    let mut body = Vec::new();
    let (mut tracker_docs, mut item_docs) = (0u64, 0u64);
    let mut tracker_ids = HashSet::new();
    let mut cursor = since;
    loop {
        let (entries, last, more) = store.feed_for_bundle(
            since,
            cursor,
            FRAME_ENTRIES,
            FRAME_BYTES,
            skip,
            wanted.as_ref(),
        )?;
        progress.add(last - cursor);
        cursor = last;
        if !entries.is_empty() {
            let mut frame = pb::BundleFrame::default();
            for e in entries {
                match e.meta.kind {
                    DocKind::Tracker => tracker_docs += 1,
                    DocKind::Item => item_docs += 1,
                }
                tracker_ids.insert(e.meta.tracker);
                frame.entries.push(wire::doc_to_wire(RemoteDoc::from(e)));
            }
            let bytes = frame.encode_to_vec();
            body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            body.extend_from_slice(&bytes);
        }
        if !more {
            break;
        }
    }
    let trackers = repo
        .trackers()
        .into_iter()
        .filter(|t| tracker_ids.contains(&t.id))
        .map(|t| pb::TrackerRef {
            id: t.id.as_bytes().to_vec(),
            name: t.name,
        })
        .collect();
    let positions = store
        .checkpoints()?
        .into_iter()
        .map(|(peer_id, inc, seq)| pb::FeedPosition {
            peer_id,
            incarnation: inc.as_bytes().to_vec(),
            seq,
        })
        .collect();
    let header = pb::BundleHeader {
        format_version: FORMAT_VERSION,
        node: repo.node().as_bytes().to_vec(),
        peer_id: me.to_bytes(),
        incarnation: incarnation.as_bytes().to_vec(),
        since,
        last_seq: cursor,
        created_ms: chrono::Utc::now().timestamp_millis().max(0) as u64,
        trackers,
        tracker_docs,
        item_docs,
        for_peer,
        filtered: !opts.trackers.is_empty(),
        positions,
    };
    let head = header.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + head.len() + 60);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&body);
    out.extend_from_slice(&0u32.to_be_bytes());
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    let summary = ExportSummary {
        header: header_info(&header),
        bytes: out.len() as u64,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    tracing::info!(
        items = item_docs,
        trackers = tracker_docs,
        since,
        last_seq = cursor,
        bytes = out.len(),
        ms = summary.duration_ms,
        "bundle exported"
    );
    Ok((out, summary))
}

/// Split off `n` bytes or say the file ends early.
fn take<'a>(rest: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8]> {
    if rest.len() < n {
        return Err(BundleError::Truncated(format!("it ends inside the {what}")));
    }
    let (a, b) = rest.split_at(n);
    *rest = b;
    Ok(a)
}

fn take_u32(rest: &mut &[u8], what: &str) -> Result<u32> {
    Ok(u32::from_be_bytes(
        take(rest, 4, what)?.try_into().expect("4 bytes"),
    ))
}

/// Only the header (for showing a bundle); the checksum is checked too.
pub fn read_header(bytes: &[u8]) -> Result<HeaderInfo> {
    let (header, _) = verify(bytes)?;
    Ok(header_info(&header))
}

/// Check magic, version and checksum; decode the header. Returns the header and the frames.
fn verify(bytes: &[u8]) -> Result<(pb::BundleHeader, &[u8])> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(BundleError::NotABundle);
    }
    let mut rest = &bytes[MAGIC.len()..];
    let version = take_u32(&mut rest, "format version")?;
    if version != FORMAT_VERSION {
        return Err(BundleError::Version(version));
    }
    if bytes.len() < MAGIC.len() + 4 + 4 + 4 + 32 {
        return Err(BundleError::Truncated(
            "it is shorter than an empty bundle".into(),
        ));
    }
    let (content, sum) = bytes.split_at(bytes.len() - 32);
    // From here on, only what the checksum covers.
    let mut rest = &content[MAGIC.len() + 4..];
    if blake3::hash(content).as_bytes() != sum {
        // A file cut short fails here too; say which it most likely is.
        if content.len() < 4 || content[content.len() - 4..] != [0, 0, 0, 0] {
            return Err(BundleError::Truncated(
                "the end-of-bundle marker and checksum are missing".into(),
            ));
        }
        return Err(BundleError::Checksum);
    }
    let len = take_u32(&mut rest, "header length")? as usize;
    if len > MAX_HEADER_BYTES {
        return Err(BundleError::Malformed(format!("header of {len} bytes")));
    }
    let head = take(&mut rest, len, "header")?;
    let header = pb::BundleHeader::decode(head)
        .map_err(|e| BundleError::Malformed(format!("header: {e}")))?;
    if header.format_version != FORMAT_VERSION {
        return Err(BundleError::Version(header.format_version));
    }
    // The frames, up to and with the end marker.
    Ok((header, rest))
}

/// Verify a whole bundle and decode every entry as strictly as a network peer's.
pub fn read(bytes: &[u8]) -> Result<Bundle> {
    let (header, mut rest) = verify(bytes)?;
    let peer = PeerId::from_bytes(&header.peer_id)
        .map_err(|_| BundleError::Malformed("the exporting peer id is not valid".into()))?;
    let incarnation =
        wire::uuid(&header.incarnation, "incarnation").map_err(|e| BundleError::Malformed(e.0))?;
    wire::uuid(&header.node, "node id").map_err(|e| BundleError::Malformed(e.0))?;
    let mut docs = Vec::new();
    let mut ids = HashSet::new();
    loop {
        let len = take_u32(&mut rest, "frame length")? as usize;
        if len == 0 {
            break;
        }
        if len > MAX_FRAME_BYTES {
            return Err(BundleError::Malformed(format!("a frame of {len} bytes")));
        }
        let frame = pb::BundleFrame::decode(take(&mut rest, len, "frame")?)
            .map_err(|e| BundleError::Malformed(format!("frame: {e}")))?;
        for e in frame.entries {
            let doc = wire::doc_from_wire(e).map_err(|e| BundleError::Malformed(e.0))?;
            if !ids.insert(doc.id) {
                return Err(BundleError::Malformed(format!(
                    "document {} appears twice",
                    doc.id
                )));
            }
            docs.push(doc);
        }
    }
    if !rest.is_empty() {
        return Err(BundleError::Malformed(
            "bytes after the end-of-bundle marker".into(),
        ));
    }
    let trackers = docs.iter().filter(|d| d.kind == DocKind::Tracker).count() as u64;
    let items = docs.len() as u64 - trackers;
    if trackers != header.tracker_docs || items != header.item_docs {
        return Err(BundleError::Malformed(format!(
            "the header announces {} trackers and {} items, the file holds {trackers} and {items}",
            header.tracker_docs, header.item_docs
        )));
    }
    Ok(Bundle {
        header,
        peer,
        incarnation,
        docs,
    })
}

/// What an import did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ImportSummary {
    /// The exporting node and peer.
    pub node: String,
    pub peer_id: String,
    pub trackers: u64,
    pub items: u64,
    /// Documents that changed here, and among them items left with a conflict to review.
    pub merged: u64,
    pub conflicts: u64,
    /// Documents we already had as the bundle has them.
    pub unchanged: u64,
    /// Documents whose earlier changes are not in the bundle (it continues an earlier one).
    pub incomplete: u64,
    /// Changes stamped further ahead of our clock than the allowed drift: not applied yet.
    pub deferred: u64,
    /// Changes the exporting peer may not make here (its allowed operations), or items of
    /// trackers not shared with it.
    pub not_allowed: u64,
    /// Documents that failed validation.
    pub refused: u64,
    /// Whether the bundle became our checkpoint on the exporter's feed.
    pub checkpoint: bool,
    pub last_seq: u64,
    pub duration_ms: u64,
}

/// Apply a verified bundle. `me` is this node's PeerId.
pub fn import(
    repo: &Repo,
    me: &PeerId,
    bundle: Bundle,
    progress: &Progress,
) -> Result<ImportSummary> {
    let started = Instant::now();
    let store = repo.store();
    let Bundle {
        header,
        peer,
        incarnation,
        docs,
    } = bundle;
    let from = crate::store::peer_tag(&peer.to_bytes());
    let config = peer_configs(repo)?
        .into_iter()
        .find(|c| c.peer_id == peer.to_string());
    let ops = config.as_ref().map_or(Ops::ALL, |c| c.ops());
    let mut summary = ImportSummary {
        node: Uuid::from_slice(&header.node)
            .map(|u| u.to_string())
            .unwrap_or_default(),
        peer_id: peer.to_string(),
        last_seq: header.last_seq,
        ..ImportSummary::default()
    };
    progress.start(docs.len() as u64);
    // Schemas first, so no item becomes visible before its tracker.
    let (trackers, mut items): (Vec<RemoteDoc>, Vec<RemoteDoc>) =
        docs.into_iter().partition(|d| d.kind == DocKind::Tracker);
    summary.trackers = trackers.len() as u64;
    summary.items = items.len() as u64;
    let n = trackers.len() as u64;
    tally(&mut summary, repo.apply_remote(trackers, from)?);
    progress.add(n);
    // The exporter's share policy here, as for its network pulls.
    if let Some(shared) = config.as_ref().and_then(|c| c.shared(&repo.trackers())) {
        let before = items.len();
        items.retain(|d| shared.contains(&d.tracker));
        summary.not_allowed += (before - items.len()) as u64;
    }
    while !items.is_empty() {
        let rest = items.split_off(items.len().min(IMPORT_STEP));
        let step = std::mem::replace(&mut items, rest);
        let n = step.len() as u64;
        let mut first = step;
        let second = first.split_off(first.len() / 2);
        let (a, b) = std::thread::scope(|s| {
            let h = s.spawn(|| repo.apply_remote_allowed(second, from, ops));
            (repo.apply_remote_allowed(first, from, ops), h.join())
        });
        tally(&mut summary, a?);
        match b {
            Ok(b) => tally(&mut summary, b?),
            Err(_) => {
                return Err(BundleError::Malformed(
                    "applying the bundle panicked".into(),
                ))
            }
        }
        progress.add(n);
    }
    // The bundle is our checkpoint on the exporter's feed when it is a whole slice of what
    // the exporter would send us, starting at or before where we are, and applied whole.
    let made_for_us = header.for_peer.is_empty() || header.for_peer == me.to_bytes();
    let applied_whole = summary.incomplete == 0 && summary.deferred == 0 && summary.refused == 0;
    if made_for_us && !header.filtered && applied_whole && peer != *me {
        let key = peer.to_bytes();
        let continues = header.since == 0
            || store
                .checkpoint(&key)?
                .is_some_and(|(inc, seq)| inc == incarnation && seq >= header.since);
        if continues {
            store.set_checkpoint(&key, incarnation, header.last_seq)?;
            summary.checkpoint = true;
        }
    }
    // What the exporter holds of our feed: the next bundle for it starts there.
    for p in &header.positions {
        if p.peer_id == me.to_bytes() {
            if let Ok(inc) = wire::uuid(&p.incarnation, "incarnation") {
                store.set_peer_has(&peer.to_bytes(), inc, p.seq)?;
            }
        }
    }
    store.flush()?;
    summary.duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        peer = %peer,
        merged = summary.merged,
        unchanged = summary.unchanged,
        incomplete = summary.incomplete,
        checkpoint = summary.checkpoint,
        ms = summary.duration_ms,
        "bundle imported"
    );
    Ok(summary)
}

fn tally(summary: &mut ImportSummary, results: Vec<(Uuid, u64, Applied)>) {
    for (id, _, applied) in results {
        match applied {
            Applied::Merged => summary.merged += 1,
            Applied::MergedWithConflict => {
                summary.merged += 1;
                summary.conflicts += 1;
            }
            Applied::Unchanged => summary.unchanged += 1,
            Applied::Incomplete { .. } => summary.incomplete += 1,
            Applied::Deferred(why) => {
                tracing::warn!(doc = %id, %why, "bundle change waits for the clock");
                summary.deferred += 1;
            }
            Applied::NotAllowed(_) => summary.not_allowed += 1,
            Applied::Refused(why) => {
                tracing::warn!(doc = %id, %why, "bundle document refused");
                summary.refused += 1;
            }
            Applied::Panicked => {
                tracing::warn!(doc = %id, "bundle document panicked Automerge; refused");
                summary.refused += 1;
            }
        }
    }
}
