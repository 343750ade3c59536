//! Crash test: clients write continuously through the API while the node is killed with SIGKILL
//! at random moments and restarted. Every acknowledged write must be there afterwards, and the
//! store must open cleanly each time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::support::TestNode;

/// Cycles in the default suite; `TRACKERSYNC_CRASH_CYCLES` raises it for a longer run.
const DEFAULT_CYCLES: usize = 30;
const WRITERS: usize = 4;

/// What the clients know was acknowledged: item id -> (last acknowledged n, last attempted n).
type Acked = Arc<Mutex<HashMap<String, (i64, i64)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let cycles: usize = std::env::var("TRACKERSYNC_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CYCLES);
    let seed: u64 = std::env::var("TRACKERSYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test seed {seed} (replay with TRACKERSYNC_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("crashy");
    let acked: Acked = Arc::default();
    let mut created_total = 0usize;
    {
        let n = TestNode::start_in(&dir).await;
        let (s, _) = n.post("/api/v1/trackers", json!({"name": "c", "fields": [{"name": "n", "type": "number"}, {"name": "w", "type": "text"}]})).await;
        assert_eq!(s, 201);
        let mut n = n;
        n.kill().await;
    }

    for cycle in 0..cycles {
        let mut node = TestNode::start_in(&dir).await;
        verify(&node, &acked).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let (base, token, http) = (node.base.clone(), node.token.clone(), node.http.clone());
            let acked = acked.clone();
            let stop = stop.clone();
            writers.push(tokio::spawn(async move {
                let mut created = 0usize;
                let mut i = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    // Alternate creating items and bumping this writer's latest item.
                    let mine: Option<(String, i64)> = acked
                        .lock()
                        .expect("lock")
                        .iter()
                        .filter(|(id, _)| id.ends_with(&format!("#{w}")))
                        .max_by_key(|(id, _)| (*id).clone())
                        .map(|(id, (a, _))| (id.clone(), *a));
                    let (req, key, next) = match mine {
                        Some((key, a)) if i % 2 == 0 => {
                            let id = key.split('#').next().expect("id").to_string();
                            acked.lock().expect("lock").get_mut(&key).expect("known").1 = a + 1;
                            (
                                http.patch(format!("{base}/api/v1/items/{id}"))
                                    .json(&json!({"fields": {"n": a + 1}})),
                                Some(key),
                                a + 1,
                            )
                        }
                        _ => (
                            http.post(format!("{base}/api/v1/trackers/c/items"))
                                .json(&json!({"fields": {"n": 0, "w": format!("writer {w}")}})),
                            None,
                            0,
                        ),
                    };
                    let Ok(res) = req.bearer_auth(&token).send().await else {
                        break;
                    };
                    if !res.status().is_success() {
                        break;
                    }
                    let Ok(body) = res.json::<serde_json::Value>().await else {
                        break;
                    };
                    let mut a = acked.lock().expect("lock");
                    match key {
                        Some(k) => a.get_mut(&k).expect("known").0 = next,
                        None => {
                            created += 1;
                            a.insert(format!("{}#{w}", body["id"].as_str().expect("id")), (0, 0));
                        }
                    }
                }
                created
            }));
        }
        // Let the writers get going, then kill at a random moment.
        let delay = rng.random_range(20..200);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        node.kill().await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            created_total += w.await.expect("writer");
        }
        println!(
            "cycle {cycle}: killed after {delay} ms, {} items acknowledged so far",
            acked.lock().expect("lock").len()
        );
    }
    let node = TestNode::start_in(&dir).await;
    verify(&node, &acked).await;
    assert!(
        created_total >= cycles,
        "the writers made progress ({created_total} creates)"
    );
}

/// Every acknowledged item exists with the acknowledged value (or the one attempted after it,
/// which may have landed without its acknowledgement), and the counters agree with the items.
async fn verify(node: &TestNode, acked: &Acked) {
    let expected = acked.lock().expect("lock").clone();
    let mut listed = 0;
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/trackers/c/items?limit=1000&after={a}"),
            None => "/api/v1/trackers/c/items?limit=1000".to_string(),
        };
        let (s, page) = node.get(&path).await;
        assert_eq!(s, 200, "{page}");
        listed += page["items"].as_array().expect("items").len();
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    for (key, (ack, attempted)) in &expected {
        let id = key.split('#').next().expect("id");
        let (s, item) = node.get(&format!("/api/v1/items/{id}")).await;
        assert_eq!(s, 200, "acknowledged item {id} is missing: {item}");
        let n = item["fields"]["n"].as_i64().expect("n");
        assert!(
            n == *ack || n == *attempted,
            "item {id}: n = {n}, acknowledged {ack}, attempted {attempted}"
        );
    }
    let (_, status) = node.get("/api/v1/status").await;
    assert_eq!(
        status["items"].as_u64(),
        Some(listed as u64),
        "live-item counter matches the index"
    );
    assert!(
        listed >= expected.len(),
        "every acknowledged create is listed"
    );
}

/// sled 0.34 writes its page-table snapshot only when it opens a store, after replaying the
/// log since the previous open; a clean stop opens the store once more so the next start
/// replays nothing that came before the stop. Its snapshot file names the log position.
fn snapshot_lsn(dir: &std::path::Path) -> Option<u64> {
    std::fs::read_dir(dir.join("db"))
        .expect("store directory")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            u64::from_str_radix(name.strip_prefix("snap.")?, 16).ok()
        })
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_checkpoints_the_store_and_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("node");
    let mut node = TestNode::start_in(&dir).await;
    let (s, _) = node
        .post(
            "/api/v1/trackers",
            json!({"name": "c", "fields": [{"name": "n", "type": "number"}]}),
        )
        .await;
    assert_eq!(s, 201);
    let mut ids = Vec::new();
    for n in 0..40 {
        let (s, item) = node
            .post("/api/v1/trackers/c/items", json!({"fields": {"n": n}}))
            .await;
        assert_eq!(s, 201, "{item}");
        ids.push((item["id"].as_str().expect("id").to_string(), n));
    }
    let before = snapshot_lsn(&dir);
    let status = node.terminate().await;
    assert!(status.success(), "clean stop exits 0: {status}");
    let after = snapshot_lsn(&dir).expect("a snapshot after the clean stop");
    assert!(
        before.is_none_or(|b| after > b),
        "the stop wrote a newer snapshot: {before:?} -> {after}"
    );
    let node = TestNode::start_in(&dir).await;
    for (id, n) in &ids {
        let (s, item) = node.get(&format!("/api/v1/items/{id}")).await;
        assert_eq!(s, 200, "{item}");
        assert_eq!(item["fields"]["n"].as_i64(), Some(*n), "{item}");
    }
    let (_, status) = node.get("/api/v1/status").await;
    assert_eq!(status["items"].as_u64(), Some(ids.len() as u64));
}
