//! Bundles and clone (issue 5): sync without a network, on real nodes through the CLI.

use std::path::Path;

use serde_json::{json, Value as Json};

use crate::support::TestNode;

async fn new_item(n: &TestNode, fields: Json) -> String {
    let (s, item) = n
        .post("/api/v1/trackers/cases/items", json!({ "fields": fields }))
        .await;
    assert_eq!(s, 201, "{item}");
    item["id"].as_str().expect("id").to_string()
}

/// Write `fields` of item `id`; returns the write's stamp.
async fn set(n: &TestNode, id: &str, fields: Json) -> String {
    let (s, e) = n
        .patch(&format!("/api/v1/items/{id}"), json!({ "fields": fields }))
        .await;
    assert_eq!(s, 200, "{e}");
    e["updated"].as_str().expect("stamp").to_string()
}

/// One peer's entry in a node's status.
async fn peer_status(n: &TestNode, peer: &str) -> Json {
    let (_, st) = n.get("/api/v1/status").await;
    st["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["peer_id"] == peer).cloned())
        .unwrap_or_else(|| panic!("{peer} not in status: {st}"))
}

/// Every item of `tracker` on a node (deleted ones too), by id.
async fn items(n: &TestNode, tracker: &str) -> Vec<Json> {
    let (s, page) = n
        .get(&format!(
            "/api/v1/trackers/{tracker}/items?limit=1000&deleted=true"
        ))
        .await;
    assert_eq!(s, 200, "{page}");
    let mut list = page["items"].as_array().expect("items").clone();
    list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    list
}

async fn export(n: &TestNode, file: &Path, extra: &[&str]) -> Json {
    let mut args = vec!["export", file.to_str().expect("path"), "--json"];
    args.extend_from_slice(extra);
    let out = n.cli(&args).await;
    assert!(out.ok, "export failed: {}", out.stderr);
    out.json()
}

async fn import(n: &TestNode, file: &Path) -> Json {
    let out = n
        .cli(&["import", file.to_str().expect("path"), "--json"])
        .await;
    assert!(out.ok, "import failed: {}", out.stderr);
    out.json()
}

/// Node A with the cases tracker, three items, a field added after them (so the tracker's
/// document is newer than its items in the change feed) and one deleted item.
async fn source() -> (TestNode, Vec<String>) {
    let a = TestNode::start().await;
    a.cases_tracker().await;
    let mut ids = Vec::new();
    for (name, age) in [("Amina", 7), ("Bao", 9), ("Chidi", 4)] {
        ids.push(new_item(&a, json!({"name": name, "age": age, "status": "open"})).await);
    }
    let (s, e) = a
        .post(
            "/api/v1/trackers/cases/fields",
            json!({"name": "village", "type": "text"}),
        )
        .await;
    assert_eq!(s, 200, "{e}");
    set(&a, &ids[0], json!({"village": "Kibera"})).await;
    let (s, e) = a
        .request(
            reqwest::Method::DELETE,
            &format!("/api/v1/items/{}", ids[2]),
            None,
        )
        .await;
    assert_eq!(s, 200, "{e}");
    (a, ids)
}

/// Export on A, import on B with no network between them: B holds the same tracker and the
/// same items; importing the same file again changes nothing.
#[tokio::test]
async fn a_bundle_moves_trackers_and_items_without_a_network_and_twice_is_a_no_op() {
    let (a, ids) = source().await;
    let b = TestNode::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cases.tsb");

    let header = export(&a, &file, &[]).await;
    assert_eq!(
        (
            header["item_docs"].as_u64(),
            header["tracker_docs"].as_u64()
        ),
        (Some(3), Some(1))
    );
    assert_eq!(header["trackers"], json!(["cases"]));

    let first = import(&b, &file).await;
    assert_eq!(
        (
            first["items"].as_u64(),
            first["trackers"].as_u64(),
            first["merged"].as_u64()
        ),
        (Some(3), Some(1), Some(4)),
        "{first}"
    );
    assert_eq!(first["peer_id"].as_str(), Some(a.peer_id().await.as_str()));
    let (_, ta) = a.get("/api/v1/trackers/cases").await;
    let (_, tb) = b.get("/api/v1/trackers/cases").await;
    assert_eq!(ta, tb, "the tracker, with its added field, is the same");
    assert_eq!(items(&a, "cases").await, items(&b, "cases").await);
    assert_eq!(items(&b, "cases").await.len(), ids.len());

    let again = import(&b, &file).await;
    assert_eq!(
        (again["merged"].as_u64(), again["unchanged"].as_u64()),
        (Some(0), Some(4)),
        "{again}"
    );
    assert_eq!(items(&a, "cases").await, items(&b, "cases").await);

    // The import is in B's sync log, as a bundle session from A.
    let (_, log) = b.get("/api/v1/log").await;
    let entry = &log[0];
    assert_eq!(
        (
            entry["trigger"].as_str(),
            entry["direction"].as_str(),
            entry["peer"].as_str()
        ),
        (
            Some("bundle"),
            Some("received"),
            Some(a.peer_id().await.as_str())
        ),
        "{log}"
    );
}

/// More documents than one bundle frame or one pull page (2,000) hold, and one of them
/// edited before and after the others were written: its feed position is on the last page,
/// its first edit before the page boundary. A whole bundle and a first network pull must
/// still carry it whole (its reader started from nothing), not only its last edit.
#[tokio::test]
async fn documents_edited_across_a_page_boundary_travel_whole() {
    use futures::StreamExt;
    let a = TestNode::start().await;
    a.cases_tracker().await;
    let x = new_item(&a, json!({"name": "Xavi", "age": 1})).await;
    set(&a, &x, json!({"age": 2})).await;
    let created: Vec<String> = futures::stream::iter(0..2_010)
        .map(|k| new_item(&a, json!({"name": format!("p{k}")})))
        .buffer_unordered(8)
        .collect()
        .await;
    set(&a, &x, json!({"age": 3, "status": "open"})).await;
    let total = created.len() + 1;

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("all.tsb");
    let header = export(&a, &file, &[]).await;
    assert_eq!(header["item_docs"].as_u64(), Some(total as u64), "{header}");
    let b = TestNode::start().await;
    let summary = import(&b, &file).await;
    assert_eq!(
        (summary["merged"].as_u64(), summary["incomplete"].as_u64()),
        (Some(total as u64 + 1), Some(0)),
        "{summary}"
    );
    let item = b.item_when(&x, |i| i["fields"]["age"] == json!(3)).await;
    assert_eq!(
        (&item["fields"]["name"], &item["fields"]["status"]),
        (&json!("Xavi"), &json!("open")),
        "{item}"
    );

    // Over the network: a first pull from nothing, in pages, needs no fetch for it.
    let c = TestNode::start().await;
    c.pair(&a).await;
    let item = c.item_when(&x, |i| i["fields"]["age"] == json!(3)).await;
    assert_eq!(item["fields"]["name"], json!("Xavi"), "{item}");
    crate::support::eventually("C holds every item", || async {
        let (_, st) = c.get("/api/v1/status").await;
        (st["items"].as_u64() == Some(total as u64)).then_some(())
    })
    .await;
    assert_eq!(
        c.metric("trackersync_sync_incomplete_fetched").await,
        0.0,
        "every document of the pages arrived whole"
    );
}

/// `--since` and `--for-peer` bundles carry only what changed; what a bundle carried is not
/// carried again, and the importing node's checkpoint on the exporter moves to the bundle's end.
#[tokio::test]
async fn incremental_bundles_carry_only_new_changes() {
    let (a, ids) = source().await;
    let b = TestNode::start().await;
    let (a_id, b_id) = (a.peer_id().await, b.peer_id().await);
    // Each knows the other by id only: no address, so no network between them.
    for (x, y) in [(&a, &b_id), (&b, &a_id)] {
        let (s, e) = x.post("/api/v1/peers", json!({"peer_id": y})).await;
        assert_eq!(s, 201, "{e}");
    }
    // An edit before the first bundle, so a later change of this item is an increment.
    set(&a, &ids[1], json!({"age": 11})).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let f1 = dir.path().join("1.tsb");
    let h1 = export(&a, &f1, &["--for-peer", &b_id]).await;
    assert_eq!(h1["item_docs"].as_u64(), Some(3), "{h1}");
    let s1 = import(&b, &f1).await;
    assert_eq!(s1["checkpoint"], json!(true), "{s1}");
    assert_eq!(
        peer_status(&b, &a_id).await["checkpoint"].as_u64(),
        h1["last_seq"].as_u64(),
        "B's checkpoint on A is where the bundle ended"
    );

    // One change and one new item on A.
    set(&a, &ids[1], json!({"age": 10})).await;
    let fresh = new_item(&a, json!({"name": "Dara"})).await;

    // By checkpoint: exactly those two.
    let f2 = dir.path().join("2.tsb");
    let h2 = export(&a, &f2, &["--since", &h1["last_seq"].to_string()]).await;
    assert_eq!(
        (h2["item_docs"].as_u64(), h2["tracker_docs"].as_u64()),
        (Some(2), Some(0)),
        "{h2}"
    );

    // For B: A does not yet know B got the first bundle, until B's answer comes back. B's
    // bundle for A leaves out everything A sent it, and tells A where B is on A's feed.
    let back = dir.path().join("back.tsb");
    let hb = export(&b, &back, &["--for-peer", &a_id]).await;
    assert_eq!(
        (hb["item_docs"].as_u64(), hb["tracker_docs"].as_u64()),
        (Some(0), Some(0)),
        "{hb}"
    );
    let sb = import(&a, &back).await;
    assert_eq!(sb["merged"].as_u64(), Some(0), "{sb}");
    let f3 = dir.path().join("3.tsb");
    let h3 = export(&a, &f3, &["--for-peer", &b_id]).await;
    assert_eq!(
        (h3["item_docs"].as_u64(), h3["tracker_docs"].as_u64()),
        (Some(2), Some(0)),
        "{h3}"
    );
    assert_eq!(h3["since"], h1["last_seq"], "{h3}");

    let s3 = import(&b, &f3).await;
    assert_eq!(
        (s3["merged"].as_u64(), s3["incomplete"].as_u64()),
        (Some(2), Some(0)),
        "{s3}"
    );
    assert_eq!(items(&a, "cases").await, items(&b, "cases").await);
    b.item_when(&fresh, |i| i["fields"]["name"] == "Dara").await;
    assert_eq!(
        peer_status(&b, &a_id).await["checkpoint"].as_u64(),
        h3["last_seq"].as_u64()
    );

    // A bundle that continues one B never imported is incomplete for a node that lacks the
    // earlier changes: reported, not silently dropped.
    let c = TestNode::start().await;
    let out = c
        .cli(&["import", f2.to_str().expect("path"), "--json"])
        .await;
    assert!(!out.ok, "an incomplete import exits non-zero");
    assert!(out.stdout.contains("\"incomplete\""), "{}", out.stdout);
}

/// Truncated, corrupted, wrong-version and forged bundles are refused with a clear message
/// and change nothing.
#[tokio::test]
async fn damaged_bundles_are_refused_and_change_nothing() {
    let (a, _) = source().await;
    let b = TestNode::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.tsb");
    export(&a, &good, &[]).await;
    let bytes = std::fs::read(&good).expect("bundle");

    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    let mut version = bytes.clone();
    version[8..12].copy_from_slice(&2u32.to_be_bytes());
    // A forged file with a valid checksum: bytes after the end marker, checksum recomputed.
    let mut forged = bytes[..bytes.len() - 32].to_vec();
    forged.extend_from_slice(b"trailing");
    let sum = blake3::hash(&forged);
    forged.extend_from_slice(sum.as_bytes());
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "truncated",
            bytes[..bytes.len() * 2 / 3].to_vec(),
            "truncated",
        ),
        ("corrupt", corrupt, "damaged"),
        ("version", version, "version 2"),
        (
            "text",
            b"name,age\nAmina,7\n".to_vec(),
            "not a trackersync bundle",
        ),
        ("forged", forged, "malformed"),
    ];
    for (name, data, message) in cases {
        let file = dir.path().join(format!("{name}.tsb"));
        std::fs::write(&file, &data).expect("write");
        let out = b.cli(&["import", file.to_str().expect("path")]).await;
        assert!(!out.ok, "{name}: import must fail");
        assert!(
            out.stderr.contains(message),
            "{name}: stderr should say {message:?}: {}",
            out.stderr
        );
        // The API refuses it the same way, with a JSON error.
        let res = b
            .http
            .post(format!("{}/api/v1/import", b.base))
            .bearer_auth(&b.token)
            .body(data)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status().as_u16(), 400, "{name}");
        let err: Json = res.json().await.expect("json error");
        assert_eq!(err["error"]["code"], "bad_bundle", "{name}: {err}");
    }
    let (_, st) = b.get("/api/v1/status").await;
    assert_eq!(
        (st["trackers"].as_u64(), st["items"].as_u64()),
        (Some(0), Some(0)),
        "{st}"
    );
    // The good one still imports.
    assert_eq!(import(&b, &good).await["merged"].as_u64(), Some(4));
}

/// Concurrent edits carried by bundles resolve as over the network: the higher-stamped write
/// wins the contested field on both nodes, edits to different fields both survive, the loser is listed.
#[tokio::test]
async fn concurrent_edits_in_bundles_resolve_like_network_sync() {
    let (a, ids) = source().await;
    let b = TestNode::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("seed.tsb");
    export(&a, &seed, &[]).await;
    import(&b, &seed).await;

    let id = &ids[0];
    let stamp_a = set(&a, id, json!({"status": "closed", "age": 8})).await;
    let stamp_b = set(&b, id, json!({"status": "open", "village": "Mathare"})).await;
    // B writes second, but it has not seen A's write: within the same millisecond their
    // stamps can tie on time and the node id decides. The contested field takes the value
    // of the higher (HLC, node) stamp; stamps sort in that order as strings.
    let (winner, loser) = if stamp_b > stamp_a {
        ("open", "closed")
    } else {
        ("closed", "open")
    };

    let fa = dir.path().join("a.tsb");
    let fb = dir.path().join("b.tsb");
    export(&a, &fa, &[]).await;
    export(&b, &fb, &[]).await;
    import(&b, &fa).await;
    import(&a, &fb).await;

    let (_, ia) = a.get(&format!("/api/v1/items/{id}")).await;
    let (_, ib) = b.get(&format!("/api/v1/items/{id}")).await;
    assert_eq!(ia, ib, "identical on both nodes");
    assert_eq!(
        (
            &ia["fields"]["status"],
            &ia["fields"]["age"],
            &ia["fields"]["village"]
        ),
        (&json!(winner), &json!(8), &json!("Mathare")),
        "{ia}"
    );
    for n in [&a, &b] {
        let (_, conflicts) = n.get(&format!("/api/v1/items/{id}/conflicts")).await;
        let status = conflicts
            .as_array()
            .and_then(|c| c.iter().find(|c| c["field"] == "status"))
            .unwrap_or_else(|| panic!("status conflict listed: {conflicts}"));
        assert_eq!(status["losers"][0]["value"], loser, "{conflicts}");
    }
}

/// `trackersync clone ADDR TRACKER` fetches one tracker, schema and items, from a peer over
/// the network, leaves the peer's other trackers alone, then keeps the tracker synced.
#[tokio::test]
async fn clone_fetches_one_tracker_and_keeps_it_synced() {
    let (a, ids) = source().await;
    let (s, e) = a
        .post(
            "/api/v1/trackers",
            json!({"name": "inventory", "fields": [{"name": "item", "type": "text"}]}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let (s, e) = a
        .post(
            "/api/v1/trackers/inventory/items",
            json!({"fields": {"item": "tents"}}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let b = TestNode::start().await;
    let (s, e) = a
        .post("/api/v1/peers", json!({"addr": b.p2p_addr().await}))
        .await;
    assert_eq!(s, 201, "{e}");

    let out = b
        .cli(&["clone", &a.p2p_addr().await, "cases", "--json"])
        .await;
    assert!(out.ok, "clone failed: {} {}", out.stdout, out.stderr);
    assert_eq!(out.json()["tracker"]["name"], "cases", "{}", out.stdout);
    // Right when clone returns: the schema with its added field, and every item.
    let (_, ta) = a.get("/api/v1/trackers/cases").await;
    let (_, tb) = b.get("/api/v1/trackers/cases").await;
    assert_eq!(ta, tb);
    assert_eq!(items(&a, "cases").await, items(&b, "cases").await);
    assert_eq!(b.get("/api/v1/trackers/inventory").await.0, 404);
    let (_, peers) = b.get("/api/v1/peers").await;
    assert_eq!(peers[0]["trackers"], json!(["cases"]), "{peers}");

    // And it stays synced.
    set(&a, &ids[1], json!({"status": "closed"})).await;
    b.item_when(&ids[1], |i| i["fields"]["status"] == "closed")
        .await;
    assert_eq!(b.get("/api/v1/trackers/inventory").await.0, 404);
}
