//! Seeded simulation of the sync core (issue 7): several nodes in one process, each a real
//! `Repo` on a real sled store, exchanging change-feed pages as a pull does, over a network
//! the scheduler controls: pages and fetches are dropped, duplicated, delayed and reordered,
//! and nodes crash and restart. After the faults stop and the nodes sync to quiescence:
//! every acknowledged write is on every node, all nodes hold identical items, and every
//! field equals the write with the highest (HLC, node) among all writes to it.
//!
//! `TRACKERSYNC_SIM_SEEDS=N` runs N seeds (default 1,000); `TRACKERSYNC_SIM_SEED=S` replays one.
//! A failure names its seed. (Item ids are UUID v7 from the real clock, so a replay takes
//! the same steps with different ids.)

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value as Json};
use trackersync::hlc::{Clock, Hlc, NodeId};
use trackersync::model::{ConflictPolicy, FieldDef};
use trackersync::repo::{Applied, RemoteDoc, Repo};
use uuid::Uuid;

const NODES: usize = 3;
const STEPS: usize = 60;

/// Shared simulated time plus a per-node skew (well within the drift bound).
struct SimClock {
    now: Arc<AtomicU64>,
    skew: i64,
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        (self.now.load(Ordering::SeqCst) as i64 + self.skew) as u64
    }
}

struct Node {
    dir: PathBuf,
    id: NodeId,
    skew: i64,
    repo: Option<Repo>,
}

impl Node {
    fn repo(&self) -> &Repo {
        self.repo.as_ref().expect("node is up")
    }

    fn open(&mut self, now: &Arc<AtomicU64>) {
        let clock = Arc::new(SimClock {
            now: now.clone(),
            skew: self.skew,
        });
        // sled's background work may hold the dropped store's lock for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Repo::open(
                &self.dir,
                self.id,
                clock.clone(),
                trackersync::hlc::DEFAULT_MAX_DRIFT_MS,
            ) {
                Ok(repo) => {
                    self.repo = Some(repo);
                    return;
                }
                Err(e)
                    if e.to_string().contains("lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::yield_now();
                }
                Err(e) => panic!("open repo: {e}"),
            }
        }
    }
}

/// A page of `from`'s feed on its way to `to`.
struct Page {
    from: usize,
    to: usize,
    incarnation: Uuid,
    since: u64,
    last: u64,
    docs: Vec<RemoteDoc>,
}

/// One acknowledged write: on every node, the item's history must hold it.
struct Write {
    item: Uuid,
    hlc: Hlc,
    field: String,
    value: Json,
}

fn peer_key(i: usize) -> Vec<u8> {
    vec![b'n', i as u8]
}

fn tag(i: usize) -> u64 {
    trackersync::store::peer_tag(&peer_key(i))
}

/// `to` pulls a page of `from`'s feed from its checkpoint.
fn pull(nodes: &[Node], from: usize, to: usize, max: usize) -> Page {
    let src = nodes[from].repo();
    let incarnation = src.store().incarnation();
    let since = match nodes[to]
        .repo()
        .store()
        .checkpoint(&peer_key(from))
        .expect("checkpoint")
    {
        Some((inc, seq)) if inc == incarnation => seq,
        _ => 0,
    };
    let (docs, last, _) = src.feed(since, since, max, 1 << 20, tag(to)).expect("feed");
    Page {
        from,
        to,
        incarnation,
        since,
        last,
        docs,
    }
}

/// Apply a delivered page; fetch what it lacks (each fetch may be lost). The checkpoint moves
/// only when the page applied whole and starts at or before it.
fn deliver(nodes: &[Node], page: Page, rng: &mut StdRng, lossy: bool) {
    let (src, dst) = (nodes[page.from].repo(), nodes[page.to].repo());
    let results = dst.apply_remote(page.docs, tag(page.from)).expect("apply");
    let mut whole = true;
    for (id, _, applied) in results {
        match applied {
            Applied::Merged | Applied::MergedWithConflict | Applied::Unchanged => {}
            Applied::Incomplete { have } => {
                if lossy && rng.random_bool(0.2) {
                    whole = false;
                    continue;
                }
                // By our heads first; a source that does not know them all answers with its
                // heads alone, and if we lack some of those, the whole document (as the
                // network loop does).
                let mut ask = have;
                while let Some(doc) = src.fetch(id, &ask).expect("fetch") {
                    let again = dst.apply_remote(vec![doc], tag(page.from)).expect("apply");
                    match &again[0].2 {
                        Applied::Merged | Applied::MergedWithConflict | Applied::Unchanged => {}
                        Applied::Incomplete { .. } if !ask.is_empty() => {
                            ask = Vec::new();
                            continue;
                        }
                        _ => whole = false,
                    }
                    break;
                }
            }
            other => panic!("honest page refused: {other:?}"),
        }
    }
    let key = peer_key(page.from);
    let at = dst.store().checkpoint(&key).expect("checkpoint");
    let continues = match at {
        Some((inc, seq)) => inc == page.incarnation && page.since <= seq,
        None => page.since == 0,
    };
    if whole && continues {
        dst.store()
            .set_checkpoint(&key, page.incarnation, page.last)
            .expect("set checkpoint");
    }
}

fn fields_def() -> Vec<FieldDef> {
    serde_json::from_value(json!([
        {"name": "name", "type": "text", "label": "name", "required": false, "options": []},
        {"name": "age", "type": "number", "label": "age", "required": false, "options": []},
        {"name": "status", "type": "choice", "label": "status", "required": false, "options": ["open", "closed", "referred"]},
    ]))
    .expect("fields")
}

fn random_field(rng: &mut StdRng) -> (String, Json) {
    match rng.random_range(0..3) {
        0 => (
            "name".into(),
            json!(format!("n{}", rng.random_range(0..1000))),
        ),
        1 => ("age".into(), json!(rng.random_range(0..100))),
        _ => (
            "status".into(),
            json!(["open", "closed", "referred"][rng.random_range(0..3)]),
        ),
    }
}

fn run(seed: u64, base: &Path) {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = Arc::new(AtomicU64::new(1_800_000_000_000));
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|i| Node {
            dir: base.join(format!("{seed}-{i}")),
            id: NodeId(Uuid::from_u128(
                ((seed as u128) << 8) | i as u128 | 1 << 100,
            )),
            skew: rng.random_range(-50..50),
            repo: None,
        })
        .collect();
    for n in &mut nodes {
        n.open(&now);
    }
    // The tracker exists everywhere before the run (created on node 0, synced).
    let tracker = nodes[0]
        .repo()
        .create_tracker("cases", fields_def(), ConflictPolicy::Newer)
        .expect("tracker");
    for to in 1..NODES {
        let page = pull(&nodes, 0, to, 100);
        deliver(&nodes, page, &mut rng, false);
    }
    assert!(nodes.iter().all(|n| n.repo().tracker("cases").is_ok()));
    let _ = tracker;

    let mut acked: Vec<Write> = Vec::new();
    let mut in_flight: Vec<Page> = Vec::new();
    for _ in 0..STEPS {
        now.fetch_add(rng.random_range(0..4), Ordering::SeqCst);
        match rng.random_range(0..100) {
            // A local write: create, edit, delete or restore.
            0..=39 => {
                let i = rng.random_range(0..NODES);
                let repo = nodes[i].repo();
                let (ids, _) = repo
                    .store()
                    .items_of_tracker(repo.tracker("cases").expect("tracker").id, None, 100, None)
                    .expect("list");
                if ids.is_empty() || (ids.len() < 6 && rng.random_bool(0.3)) {
                    let (f, v) = random_field(&mut rng);
                    let mut m = Map::new();
                    m.insert(f.clone(), v.clone());
                    let view = repo.create_item("cases", m).expect("create");
                    acked.push(Write {
                        item: view.id,
                        hlc: view.updated,
                        field: f,
                        value: v,
                    });
                } else {
                    let id = ids[rng.random_range(0..ids.len())];
                    match rng.random_range(0..10) {
                        0 => {
                            repo.delete_item(&id.to_string()).expect("delete");
                        }
                        1 => {
                            repo.restore_item(&id.to_string()).expect("restore");
                        }
                        _ => {
                            let (f, v) = random_field(&mut rng);
                            let mut m = Map::new();
                            m.insert(f.clone(), v.clone());
                            let view = repo.update_item(&id.to_string(), m).expect("update");
                            acked.push(Write {
                                item: id,
                                hlc: view.updated,
                                field: f,
                                value: v,
                            });
                        }
                    }
                }
            }
            // A pull request answered: the page travels (or is lost, or duplicated).
            40..=69 => {
                let from = rng.random_range(0..NODES);
                let to = (from + rng.random_range(1..NODES)) % NODES;
                let page = pull(&nodes, from, to, rng.random_range(1..6));
                if rng.random_bool(0.15) {
                    continue; // lost
                }
                let at = rng.random_range(0..=in_flight.len());
                in_flight.insert(at, page);
            }
            // A page arrives (any of those in flight: reordering).
            70..=94 => {
                if !in_flight.is_empty() {
                    let k = rng.random_range(0..in_flight.len());
                    let page = in_flight.remove(k);
                    // Duplicate delivery now and then.
                    if rng.random_bool(0.1) {
                        in_flight.push(Page {
                            from: page.from,
                            to: page.to,
                            incarnation: page.incarnation,
                            since: page.since,
                            last: page.last,
                            docs: page.docs.clone(),
                        });
                    }
                    deliver(&nodes, page, &mut rng, true);
                }
            }
            // A node crashes and restarts: pages to it are lost.
            _ => {
                let i = rng.random_range(0..NODES);
                nodes[i].repo = None;
                in_flight.retain(|p| p.to != i);
                nodes[i].open(&now);
            }
        }
    }

    // Heal: no more faults; sync every pair until nothing moves.
    for _ in 0..50 {
        let before: u64 = nodes.iter().map(|n| n.repo().store().last_seq()).sum();
        for from in 0..NODES {
            for to in 0..NODES {
                if from != to {
                    loop {
                        let page = pull(&nodes, from, to, 50);
                        let (since, last) = (page.since, page.last);
                        deliver(&nodes, page, &mut rng, false);
                        if last == since {
                            break;
                        }
                    }
                }
            }
        }
        let after: u64 = nodes.iter().map(|n| n.repo().store().last_seq()).sum();
        if after == before {
            break;
        }
    }
    check(seed, &nodes, &acked);
}

fn check(seed: u64, nodes: &[Node], acked: &[Write]) {
    let views: Vec<BTreeMap<Uuid, trackersync::item::ItemView>> = nodes
        .iter()
        .map(|n| {
            let repo = n.repo();
            let t = repo.tracker("cases").expect("tracker").id;
            let (ids, _) = repo
                .store()
                .items_of_tracker(t, None, 10_000, None)
                .expect("list");
            ids.into_iter()
                .map(|id| (id, repo.item(&id.to_string()).expect("item")))
                .collect()
        })
        .collect();
    for (i, v) in views.iter().enumerate().skip(1) {
        assert_eq!(
            v.keys().collect::<Vec<_>>(),
            views[0].keys().collect::<Vec<_>>(),
            "seed {seed}: node {i} holds other items than node 0"
        );
        for (id, item) in v {
            assert_eq!(
                item, &views[0][id],
                "seed {seed}: item {id} differs on node {i}"
            );
        }
    }
    for w in acked {
        for (i, n) in nodes.iter().enumerate() {
            let history = n.repo().history(&w.item.to_string()).expect("history");
            assert!(
                history
                    .iter()
                    .any(|h| h.hlc == w.hlc
                        && h.fields.get(&w.field) == Some(&Some(w.value.clone()))),
                "seed {seed}: acknowledged write {} = {} at {} on {} missing on node {i}",
                w.field,
                w.value,
                w.hlc,
                w.item
            );
        }
    }
    // Each field is the write with the highest stamp among all writes to it (from history).
    let repo = nodes[0].repo();
    for (id, item) in &views[0] {
        let history = repo.history(&id.to_string()).expect("history");
        let mut best: HashMap<&str, (Hlc, &Option<Json>)> = HashMap::new();
        for h in &history {
            for (f, v) in &h.fields {
                if best.get(f.as_str()).is_none_or(|(at, _)| h.hlc > *at) {
                    best.insert(f, (h.hlc, v));
                }
            }
        }
        for (f, (_, v)) in best {
            assert_eq!(
                item.fields.get(f),
                v.as_ref(),
                "seed {seed}: item {id} field {f} is not its latest write"
            );
        }
    }
}

#[test]
fn seeded_faults_converge_with_nothing_lost() {
    // tmpfs when there is one: fsync there is free, and the simulation is about logic.
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let seeds: Vec<u64> = match std::env::var("TRACKERSYNC_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("TRACKERSYNC_SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("TRACKERSYNC_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1000);
            (0..n).collect()
        }
    };
    // Two workers (the CI machine has two cores).
    let next = Arc::new(AtomicU64::new(0));
    let seeds = Arc::new(seeds);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (next, seeds, dir) = (next.clone(), seeds.clone(), root.path().to_path_buf());
            std::thread::spawn(move || loop {
                let k = next.fetch_add(1, Ordering::SeqCst) as usize;
                let Some(&seed) = seeds.get(k) else {
                    return;
                };
                let result = std::panic::catch_unwind(|| run(seed, &dir));
                let _ = std::fs::remove_dir_all(dir.join(format!("{seed}-0")));
                let _ = std::fs::remove_dir_all(dir.join(format!("{seed}-1")));
                let _ = std::fs::remove_dir_all(dir.join(format!("{seed}-2")));
                if let Err(e) = result {
                    eprintln!("simulation failed: replay with TRACKERSYNC_SIM_SEED={seed}");
                    std::panic::resume_unwind(e);
                }
            })
        })
        .collect();
    for w in workers {
        w.join()
            .expect("a seed failed (its number is printed above)");
    }
}
