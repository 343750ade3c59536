//! Giving back the disk sled 0.34 keeps: a clean stop copies a store whose log file holds
//! several times its live data into a fresh directory and swaps the two.
//!
//! sled frees a log segment only once at most half of it is live, and never shrinks its file
//! unless the segments at its end are free, so a store that takes a steady stream of small
//! durable writes settles at several times its live data (8.5x in the soak of issue 7), and a
//! freshly seeded one at about 2.4x. sled cannot compact a store it has open, and its own
//! `export`/`import` panic on I/O errors, so the copy is done here, key by key in batches,
//! after the store is closed.
//!
//! Crash safety rests on the order of the steps: the copy is written to `<store>.rewrite` and
//! made durable; then `<store>` is renamed to `<store>.old`, `<store>.rewrite` to `<store>`,
//! and `<store>.old` is removed. [`recover`], run before every open, finishes or undoes
//! whatever a crash interrupted: a leftover `.rewrite` beside the store is an unfinished copy
//! and is removed; `.rewrite` and `.old` with no store mean the crash fell between the
//! renames, when the copy was already complete.
//!
//! Deciding costs a scan of the store, so it is not done at every stop: the live size found
//! by the last scan is kept under [`META_LIVE_BYTES`], and the next scan waits until the file
//! has grown past [`RATIO`] times that.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{open_sled, Result, StoreError};

/// A store is rewritten when its file is more than this many times its live data... (A fresh
/// copy is itself 2.5-2.7x: sled writes each leaf several times as it fills, and keeps
/// segments that are up to half garbage. A seeded store of 100,000 items is about 2.4x.)
const RATIO: u64 = 4;
/// ...and at least this big: below it the disk saved is not worth the stop's time.
const MIN_FILE: u64 = 64 << 20;
/// Keys and values copied per batch.
const BATCH_BYTES: usize = 8 << 20;

/// The live bytes (keys and values) found by the last scan, u64 BE.
const META_LIVE_BYTES: &[u8] = b"Mlivebytes";

/// When to rewrite; tests lower the thresholds.
#[derive(Clone, Copy, Debug)]
pub(super) struct Policy {
    pub ratio: u64,
    pub min_file: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            ratio: RATIO,
            min_file: MIN_FILE,
        }
    }
}

/// What a rewrite did, for the log.
#[derive(Debug)]
pub(super) struct Rewritten {
    pub file_before: u64,
    /// 0 if the rewritten store could not be opened again to measure it.
    pub file_after: u64,
    pub live: u64,
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Sled(sled::Error::Io(e))
}

/// Finish or undo a rewrite a crash interrupted (see the module docs). Call before opening.
pub(super) fn recover(path: &Path) -> Result<()> {
    let (fresh, old) = (sibling(path, ".rewrite"), sibling(path, ".old"));
    if !path.exists() && fresh.exists() && old.exists() {
        tracing::info!("finishing a store rewrite that a crash interrupted");
        std::fs::rename(&fresh, path).map_err(io)?;
        sync_parent(path)?;
    }
    if fresh.exists() {
        tracing::info!("removing an unfinished store rewrite");
        std::fs::remove_dir_all(&fresh).map_err(io)?;
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io)?;
    }
    Ok(())
}

/// Keys and values held in every tree of `db`.
fn live_bytes(db: &sled::Db) -> Result<u64> {
    let mut n = 0u64;
    for name in db.tree_names() {
        for kv in db.open_tree(name)?.iter() {
            let (k, v) = kv?;
            n += (k.len() + v.len()) as u64;
        }
    }
    Ok(n)
}

/// Whether the store `db` (closed by everyone else) is worth a rewrite: its file size and live
/// size if so. Otherwise records the live size it scanned, if it scanned.
pub(super) fn due(db: &sled::Db, policy: Policy) -> Result<Option<(u64, u64)>> {
    let file = db.size_on_disk()?;
    if file < policy.min_file {
        return Ok(None);
    }
    let last_live = match db.get(META_LIVE_BYTES)? {
        Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
            key: "Mlivebytes".into(),
            what: "live size",
        })?),
        None => 0,
    };
    if file <= policy.ratio.saturating_mul(last_live) {
        return Ok(None);
    }
    let live = live_bytes(db)?;
    if file > policy.ratio.saturating_mul(live) {
        return Ok(Some((file, live)));
    }
    db.insert(META_LIVE_BYTES, &live.to_be_bytes())?;
    db.flush()?;
    Ok(None)
}

/// Copy the store `db` (open at `path`, closed by everyone else) into a fresh directory and
/// swap it in. `db` is consumed: the old store is closed before the swap.
pub(super) fn rewrite(path: &Path, db: sled::Db, cache_bytes: u64) -> Result<Rewritten> {
    let t0 = Instant::now();
    let file_before = db.size_on_disk()?;
    let fresh = sibling(path, ".rewrite");
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh).map_err(io)?;
    }
    let copied = copy(&db, &fresh, cache_bytes);
    drop(db);
    let live = match copied {
        Ok(live) => live,
        Err(e) => {
            // The store is untouched; what was copied goes (a full disk is the likely cause).
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(e);
        }
    };
    let old = sibling(path, ".old");
    std::fs::rename(path, &old).map_err(io)?;
    std::fs::rename(&fresh, path).map_err(io)?;
    sync_parent(path)?;
    // The copy is the store now; what follows only tidies up, and a failure there is no
    // failed rewrite (the next open removes `.old`; without the snapshot it replays the log).
    if let Err(e) = std::fs::remove_dir_all(&old) {
        tracing::warn!(error = %e, "cannot remove the store replaced by its rewrite; the next start will");
    }
    // Open once more so sled writes its page-table snapshot (as `close_with_checkpoint` does):
    // the next start then replays nothing of the copy.
    let file_after = match open_sled(path, cache_bytes).and_then(|db| db.size_on_disk()) {
        Ok(size) => size,
        Err(e) => {
            tracing::warn!(error = %e, "store rewritten but not checkpointed; the next start replays its log");
            0
        }
    };
    let r = Rewritten {
        file_before,
        file_after,
        live,
    };
    tracing::info!(
        file_before = r.file_before,
        file_after = r.file_after,
        live = r.live,
        elapsed = ?t0.elapsed(),
        "store rewritten to give back disk space"
    );
    Ok(r)
}

/// Copy every tree of `db` into a new store at `to`, durably. Returns the bytes copied.
fn copy(db: &sled::Db, to: &Path, cache_bytes: u64) -> Result<u64> {
    let new = open_sled(to, cache_bytes)?;
    let mut live = 0u64;
    for name in db.tree_names() {
        let (src, dst) = (db.open_tree(&name)?, new.open_tree(&name)?);
        let (mut batch, mut bytes) = (sled::Batch::default(), 0usize);
        for kv in src.iter() {
            let (k, v) = kv?;
            bytes += k.len() + v.len();
            batch.insert(k, v);
            if bytes >= BATCH_BYTES {
                dst.apply_batch(std::mem::take(&mut batch))?;
                live += bytes as u64;
                bytes = 0;
            }
        }
        dst.apply_batch(batch)?;
        live += bytes as u64;
    }
    new.insert(META_LIVE_BYTES, &live.to_be_bytes())?;
    new.flush()?;
    drop(new);
    sync_tree(to)?;
    Ok(live)
}

/// fsync every file under `dir`, and the directories themselves: sled writes its log with
/// `sync_file_range`, which persists neither the device cache nor the file's size.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if entry.file_type().map_err(io)?.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io)
}

fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|f| f.sync_all())
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::super::tests::{commit_all, data_keys};
    use super::super::{DocData, Store};
    use super::*;

    /// A store at `dir/db` with `docs` documents, each rewritten `times` times with `size`
    /// bytes: all but the last of each are garbage in sled's log.
    fn churned_store(dir: &Path, docs: usize, times: usize, size: usize) -> Store {
        let store = Store::open(&dir.join("db")).expect("open");
        let (t, ids) = (
            Uuid::now_v7(),
            (0..docs).map(|_| Uuid::now_v7()).collect::<Vec<_>>(),
        );
        for round in 0..times {
            commit_all(
                &store,
                ids.iter()
                    .map(|&id| (id, t, DocData::Snapshot(vec![round as u8; size]))),
            );
            // Flushed every round, as the node's group commit does. Tens of megabytes
            // written unflushed can hang sled 0.34: its writer waits, holding the segment
            // lock, for a file truncation queued behind I/O tasks that need that lock
            // (spacejam/sled#1269, fixed after 0.34.7).
            store.flush_for_stop().expect("flush");
        }
        store
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n != "db")
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_store_grown_past_its_live_data_is_rewritten_whole_and_smaller() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = churned_store(dir.path(), 500, 20, 8192);
        let (before, incarnation, last_seq) =
            (data_keys(&store), store.incarnation(), store.last_seq());
        // Thresholds below the defaults, for a small store: the churn leaves it at 4-6x its
        // live data, and a fresh copy takes about 2.6x.
        let policy = Policy {
            ratio: 3,
            min_file: 0,
        };
        let r = store.close_with(policy).expect("close").expect("rewritten");
        assert!(r.file_after < 3 * r.live, "{r:?}");
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );

        let store = Store::open(&dir.path().join("db")).expect("reopen");
        assert_eq!(
            data_keys(&store),
            before,
            "every key and value, as they were"
        );
        assert_eq!(store.incarnation(), incarnation);
        assert_eq!(store.last_seq(), last_seq);
        let size = store.size_on_disk().expect("size");
        assert!(size < 3 * r.live, "{size} B on disk after reopening; {r:?}");
        // The copy recorded its live size; at the default ratio the next stop leaves it.
        let policy = Policy {
            ratio: RATIO,
            min_file: 0,
        };
        assert!(store.close_with(policy).expect("close").is_none());
    }

    #[test]
    fn a_store_near_its_live_size_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = churned_store(dir.path(), 200, 1, 4096);
        let before = data_keys(&store);
        let policy = Policy {
            ratio: 20,
            min_file: 0,
        };
        assert!(store.close_with(policy).expect("close").is_none());
        let store = Store::open(&dir.path().join("db")).expect("reopen");
        assert_eq!(data_keys(&store), before);
    }

    /// Recursive copy of a closed store directory.
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read dir") {
            let e = e.expect("entry");
            if e.file_type().expect("type").is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
            }
        }
    }

    /// Open the store in `dir`: it holds `before`, and nothing is left beside it.
    fn open_whole(dir: &Path, before: &[(Vec<u8>, Vec<u8>)], when: &str) -> Store {
        let store = Store::open(&dir.join("db")).unwrap_or_else(|e| panic!("open {when}: {e}"));
        assert_eq!(data_keys(&store), before, "{when}");
        assert!(leftovers(dir).is_empty(), "{when}: {:?}", leftovers(dir));
        store
    }

    #[test]
    fn an_interrupted_rewrite_is_undone_or_finished_at_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        let store = churned_store(dir.path(), 50, 2, 512);
        let before = data_keys(&store);
        store.close_with_checkpoint().expect("close");

        // Killed during the copy: the half-written copy goes, the store is as it was.
        std::fs::create_dir(dir.path().join("db.rewrite")).expect("mkdir");
        std::fs::write(dir.path().join("db.rewrite/db"), b"half a log").expect("write");
        let store = open_whole(dir.path(), &before, "after a killed copy");
        store.close_with_checkpoint().expect("close");

        // Killed between the two renames: the complete copy becomes the store.
        copy_dir(&db, &dir.path().join("db.rewrite"));
        std::fs::rename(&db, dir.path().join("db.old")).expect("rename");
        let store = open_whole(dir.path(), &before, "after a kill between the renames");
        store.close_with_checkpoint().expect("close");

        // Killed before removing the old store: it goes.
        copy_dir(&db, &dir.path().join("db.old"));
        open_whole(dir.path(), &before, "after a kill before the removal");
    }
}
