//! The cache of decoded documents, bounded by an estimate of the memory they hold.
//!
//! A count bound is not enough: an Automerge document keeps its whole history in memory, so a
//! much-edited item costs megabytes where a fresh one costs kilobytes. Each entry's cost is
//! recomputed from the document's size whenever a caller lets go of it, and least recently
//! used entries nobody holds are evicted while the total is over budget.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::ReadDoc;
use lru::LruCache;
use uuid::Uuid;

use super::Loaded;

/// Measured with a counting allocator on automerge 0.12 (release build): an empty item
/// document holds about 12 KiB; each change adds about 200 bytes and each operation 40
/// (loaded) to 100 (built up by edits) more.
const DOC_BASE_BYTES: usize = 12 * 1024;
const CHANGE_BYTES: usize = 200;
const OP_BYTES: usize = 64;
/// An entry without a document still costs its bookkeeping, so lookups alone cannot grow the
/// cache without bound.
const ENTRY_BYTES: usize = 256;

/// Estimated heap bytes of a decoded document.
fn estimate(loaded: &Loaded) -> usize {
    let stats = loaded.doc.stats();
    ENTRY_BYTES
        + DOC_BASE_BYTES
        + CHANGE_BYTES * stats.num_changes as usize
        + OP_BYTES * stats.num_ops as usize
}

pub(super) struct DocCache {
    lru: Mutex<LruCache<Uuid, Arc<Entry>>>,
    /// Sum of the entries' costs.
    bytes: AtomicUsize,
    budget: usize,
}

struct Entry {
    doc: Mutex<Option<Loaded>>,
    /// This entry's share of `DocCache::bytes`, as of the last time a caller let go of it.
    cost: AtomicUsize,
}

/// A handle on one cached document; while it exists the document is not evicted.
pub(super) struct Slot<'c> {
    entry: Arc<Entry>,
    cache: &'c DocCache,
}

/// The locked document. Dropping it re-estimates the document's cost.
pub(super) struct DocGuard<'a> {
    doc: MutexGuard<'a, Option<Loaded>>,
    entry: &'a Entry,
    cache: &'a DocCache,
}

impl DocCache {
    pub fn new(budget: usize) -> DocCache {
        DocCache {
            lru: Mutex::new(LruCache::unbounded()),
            bytes: AtomicUsize::new(0),
            budget,
        }
    }

    /// The entry for `id`, created empty if it is not cached.
    pub fn slot(&self, id: Uuid) -> Slot<'_> {
        let mut lru = self.lru.lock().expect("cache lock");
        let entry = match lru.get(&id) {
            Some(e) => e.clone(),
            None => {
                let e = Arc::new(Entry {
                    doc: Mutex::new(None),
                    cost: AtomicUsize::new(ENTRY_BYTES),
                });
                self.bytes.fetch_add(ENTRY_BYTES, Ordering::Relaxed);
                lru.put(id, e.clone());
                e
            }
        };
        self.evict(&mut lru);
        Slot { entry, cache: self }
    }

    /// Evict least recently used entries nobody holds until the total is within budget. Held
    /// entries are promoted and skipped; each entry is looked at most once.
    fn evict(&self, lru: &mut LruCache<Uuid, Arc<Entry>>) {
        let mut budget = lru.len();
        while self.bytes.load(Ordering::Relaxed) > self.budget && budget > 0 {
            budget -= 1;
            let Some((k, v)) = lru.peek_lru() else {
                break;
            };
            let k = *k;
            // Only the cache holds it, so nobody can lock it and change its cost meanwhile.
            if Arc::strong_count(v) == 1 {
                let cost = v.cost.load(Ordering::Relaxed);
                lru.pop_lru();
                self.bytes.fetch_sub(cost, Ordering::Relaxed);
            } else {
                lru.promote(&k);
            }
        }
    }

    /// Estimated bytes held by cached documents.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.lru.lock().expect("cache lock").len()
    }
}

impl Slot<'_> {
    pub fn lock(&self) -> DocGuard<'_> {
        DocGuard {
            doc: self.entry.doc.lock().expect("doc lock"),
            entry: &self.entry,
            cache: self.cache,
        }
    }
}

impl Deref for DocGuard<'_> {
    type Target = Option<Loaded>;
    fn deref(&self) -> &Option<Loaded> {
        &self.doc
    }
}

impl DerefMut for DocGuard<'_> {
    fn deref_mut(&mut self) -> &mut Option<Loaded> {
        &mut self.doc
    }
}

impl Drop for DocGuard<'_> {
    fn drop(&mut self) {
        let cost = self.doc.as_ref().map_or(ENTRY_BYTES, estimate);
        let old = self.entry.cost.swap(cost, Ordering::Relaxed);
        if cost >= old {
            self.cache.bytes.fetch_add(cost - old, Ordering::Relaxed);
        } else {
            self.cache.bytes.fetch_sub(old - cost, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    use super::*;

    fn doc_with_changes(n: usize) -> Loaded {
        let mut doc = AutoCommit::new();
        for i in 0..n {
            doc.put(ROOT, "a", i as i64).expect("put");
            doc.commit();
        }
        Loaded {
            doc: Box::new(doc),
            meta: None,
            max_hlc: None,
        }
    }

    impl DocCache {
        fn contains(&self, id: Uuid) -> bool {
            self.lru.lock().expect("cache lock").contains(&id)
        }

        fn sum_of_costs(&self) -> usize {
            let lru = self.lru.lock().expect("cache lock");
            lru.iter()
                .map(|(_, e)| e.cost.load(Ordering::Relaxed))
                .sum()
        }
    }

    #[test]
    fn a_long_history_counts_for_its_size_and_a_held_entry_stays() {
        let cache = DocCache::new(256 * 1024);
        let big = Uuid::now_v7();
        let slot = cache.slot(big);
        *slot.lock() = Some(doc_with_changes(2000));
        let big_cost = cache.bytes();
        assert!(
            big_cost > 256 * 1024,
            "2,000 changes estimated at {big_cost} B"
        );

        // Over budget, but the big document is held: small ones come and go around it.
        let small: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
        for id in &small {
            *cache.slot(*id).lock() = Some(doc_with_changes(1));
        }
        assert!(cache.contains(big));
        assert_eq!(cache.bytes(), cache.sum_of_costs());

        // Let go of it: the next lookup evicts it, and the total is within budget again.
        drop(slot);
        let _ = cache.slot(Uuid::now_v7());
        assert!(!cache.contains(big));
        assert!(cache.bytes() <= 256 * 1024, "{} B cached", cache.bytes());
        assert_eq!(cache.bytes(), cache.sum_of_costs());
        let later: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        for id in &later {
            *cache.slot(*id).lock() = Some(doc_with_changes(1));
        }
        assert!(later.iter().all(|id| cache.contains(*id)), "small ones fit");
    }

    #[test]
    fn an_empty_entry_costs_what_the_cache_counts_for_it() {
        // An entry is kept for every document looked up, loaded or not: its own size (behind
        // an `Arc`, keyed in the LRU) must stay within what the budget counts for it. With the
        // document inline it was 4.4 KiB, and 100,000 received items held 440 MB.
        let own = std::mem::size_of::<Entry>() + 2 * std::mem::size_of::<usize>();
        let in_lru = std::mem::size_of::<Uuid>() + 4 * std::mem::size_of::<usize>();
        assert!(own + in_lru <= ENTRY_BYTES, "{own} + {in_lru} B");
    }

    #[test]
    fn the_cost_follows_the_document_as_it_grows_and_goes() {
        let cache = DocCache::new(usize::MAX);
        let slot = cache.slot(Uuid::now_v7());
        assert_eq!(cache.bytes(), ENTRY_BYTES);
        *slot.lock() = Some(doc_with_changes(1));
        let one = cache.bytes();
        {
            let mut g = slot.lock();
            let loaded = g.as_mut().expect("loaded");
            for i in 0..100 {
                loaded.doc.put(ROOT, "b", i).expect("put");
                loaded.doc.commit();
            }
        }
        assert!(cache.bytes() >= one + 100 * CHANGE_BYTES);
        *slot.lock() = None;
        assert_eq!(cache.bytes(), ENTRY_BYTES);
    }
}
