//! Sync between real node processes over libp2p on loopback.

use serde_json::json;

use crate::support::{eventually, TestNode};

#[tokio::test]
async fn changes_flow_both_ways_live_including_schema() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    a.pair(&b).await;
    let t = a.cases_tracker().await;
    let tid = t["id"].as_str().expect("id").to_string();
    eventually("tracker on b", || async {
        (b.get(&format!("/api/v1/trackers/{tid}")).await.0 == 200).then_some(())
    })
    .await;

    let (_, item) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "Amina", "age": 7}}),
        )
        .await;
    let id = item["id"].as_str().expect("id").to_string();
    let on_b = b.item_when(&id, |_| true).await;
    assert_eq!(on_b["fields"], item["fields"]);
    assert_eq!(on_b["display_id"], item["display_id"]);
    assert_eq!(on_b["origin"], item["origin"]);

    // An edit on b reaches a.
    let (s, e) = b
        .patch(
            &format!("/api/v1/items/{id}"),
            json!({"fields": {"status": "closed"}}),
        )
        .await;
    assert_eq!(s, 200, "{e}");
    a.item_when(&id, |i| i["fields"]["status"] == "closed")
        .await;

    // A field added on b reaches a's schema, and values of it flow.
    let (s, _) = b
        .post(
            "/api/v1/trackers/cases/fields",
            json!({"name": "where", "type": "text"}),
        )
        .await;
    assert_eq!(s, 200);
    eventually("new field on a", || async {
        let (_, t) = a.get("/api/v1/trackers/cases").await;
        t["fields"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["name"] == "where"))
            .then_some(())
    })
    .await;
    let (s, e) = a
        .patch(
            &format!("/api/v1/items/{id}"),
            json!({"fields": {"where": "Camp A"}}),
        )
        .await;
    assert_eq!(s, 200, "{e}");
    b.item_when(&id, |i| i["fields"]["where"] == "Camp A").await;

    // Deletes replicate.
    a.request(
        reqwest::Method::DELETE,
        &format!("/api/v1/items/{id}"),
        None,
    )
    .await;
    b.item_when(&id, |i| i["deleted"] == true).await;

    let (_, peers) = a.get("/api/v1/peers").await;
    assert_eq!(peers[0]["connected"], true);
    assert_eq!(
        peers[0]["peer_id"].as_str(),
        Some(b.peer_id().await.as_str())
    );
}

/// Both sides edit while apart (one of them through the CLI with its node stopped); after
/// reconnecting nothing is lost, the same-field conflict resolves to the later write on both,
/// and the loser is listed.
#[tokio::test]
async fn offline_edits_on_both_sides_converge() {
    let a = TestNode::start().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let b_dir = tmp.path().join("b");
    let mut b = TestNode::start_in(&b_dir).await;
    a.pair(&b).await;
    a.cases_tracker().await;
    let (_, item) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "Juan", "age": 9}}),
        )
        .await;
    let id = item["id"].as_str().expect("id").to_string();
    b.item_when(&id, |_| true).await;

    // Stopped, not killed: a received change is visible before it is durable (it is durable
    // at its source, which sends it again), so a kill right after b shows the item could
    // take it from b's disk, and the CLI below would not find it.
    assert!(b.terminate().await.success());
    // b's side, offline, through the CLI (embedded node): first the contested field...
    let out = crate::support::run_cli(&b_dir, &["item", "set", &id, "status=open", "age=10"]).await;
    assert!(out.ok, "{}", out.stderr);
    let out = crate::support::run_cli(&b_dir, &["item", "add", "cases", "name=Offline-B"]).await;
    assert!(out.ok, "{}", out.stderr);
    // ...then a's later write to the same field, and a's own new item.
    let (_, a_edit) = a
        .patch(
            &format!("/api/v1/items/{id}"),
            json!({"fields": {"status": "closed"}}),
        )
        .await;
    a.post(
        "/api/v1/trackers/cases/items",
        json!({"fields": {"name": "Offline-A"}}),
    )
    .await;

    let b = TestNode::start_in(&b_dir).await;
    for n in [&a, &b] {
        let merged = n
            .item_when(&id, |i| {
                i["fields"]["age"] == 10 && i["fields"]["status"] == "closed"
            })
            .await;
        assert!(merged["updated"].as_str() >= a_edit["updated"].as_str());
        let (_, conflicts) = n.get(&format!("/api/v1/items/{id}/conflicts")).await;
        let c = conflicts
            .as_array()
            .expect("array")
            .iter()
            .find(|c| c["field"] == "status")
            .expect("status conflict");
        assert_eq!(c["winner"]["value"], "closed");
        assert_eq!(c["losers"][0]["value"], "open");
        eventually("both offline items", || async {
            let (_, page) = n.get("/api/v1/trackers/cases/items").await;
            let names: Vec<String> = page["items"]
                .as_array()?
                .iter()
                .filter_map(|i| i["fields"]["name"].as_str().map(String::from))
                .collect();
            (names.contains(&"Offline-A".to_string()) && names.contains(&"Offline-B".to_string()))
                .then_some(())
        })
        .await;
    }
}

/// A - B - C with A and C not connected: a change on A reaches C, and one on C reaches A.
#[tokio::test]
async fn changes_travel_along_a_chain() {
    let (a, b, c) = (
        TestNode::start().await,
        TestNode::start().await,
        TestNode::start().await,
    );
    a.pair(&b).await;
    b.pair(&c).await;
    a.cases_tracker().await;
    let (_, item) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "Chain"}}),
        )
        .await;
    let id = item["id"].as_str().expect("id").to_string();
    c.item_when(&id, |_| true).await;
    let (s, e) = c
        .patch(
            &format!("/api/v1/items/{id}"),
            json!({"fields": {"age": 3}}),
        )
        .await;
    assert_eq!(s, 200, "{e}");
    a.item_when(&id, |i| i["fields"]["age"] == 3).await;
    let (_, peers) = a.get("/api/v1/peers").await;
    assert_eq!(peers.as_array().map(Vec::len), Some(1), "a only knows b");
}

/// A node that authorizes A, but that A does not authorize, gets nothing from A; and a revoked
/// peer stops receiving at once.
#[tokio::test]
async fn unauthorized_and_revoked_peers_get_nothing() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    let intruder = TestNode::start().await;
    a.pair(&b).await;
    let (s, _) = intruder
        .post("/api/v1/peers", json!({"addr": a.p2p_addr().await}))
        .await;
    assert_eq!(s, 201);
    a.cases_tracker().await;
    let (_, item) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "Secret"}}),
        )
        .await;
    let id = item["id"].as_str().expect("id").to_string();
    b.item_when(&id, |_| true).await;
    // The honest peer has it; the intruder, which dialed a, has no tracker and no item.
    let (_, st) = intruder.get("/api/v1/status").await;
    assert_eq!(
        (st["trackers"].as_u64(), st["items"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(intruder.get(&format!("/api/v1/items/{id}")).await.0, 404);
    // a closes the intruder's connections as they open (the intruder keeps redialing).
    eventually("intruder disconnected", || async {
        let (_, peers) = intruder.get("/api/v1/peers").await;
        (peers[0]["connected"] == false && peers[0]["last_error"].is_string()).then_some(())
    })
    .await;

    // Revoke b on a: b is disconnected and a's next change does not reach it.
    let b_id = b.peer_id().await;
    let (s, _) = a
        .request(
            reqwest::Method::DELETE,
            &format!("/api/v1/peers/{b_id}"),
            None,
        )
        .await;
    assert_eq!(s, 200);
    eventually("b disconnected", || async {
        let (_, peers) = b.get("/api/v1/peers").await;
        (peers[0]["connected"] == false).then_some(())
    })
    .await;
    let (_, later) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "After revocation"}}),
        )
        .await;
    let later_id = later["id"].as_str().expect("id").to_string();
    // Control: a node paired now receives the change; by then b would have too, were it
    // still authorized.
    let control = TestNode::start().await;
    a.pair(&control).await;
    control.item_when(&later_id, |_| true).await;
    assert_eq!(
        b.get(&format!("/api/v1/items/{later_id}")).await.0,
        404,
        "a revoked peer got a change"
    );
    let (_, st) = b.get("/api/v1/status").await;
    assert_eq!(st["items"].as_u64(), Some(1));
}

/// Nodes started with the same join key authorize each other on first contact: only one side
/// names the other, yet both sync. A node with another key gets nothing.
#[tokio::test]
async fn a_shared_join_key_authorizes_peers_on_first_contact() {
    let a = TestNode::start_args(&["--join-key", "field-team-7"]).await;
    let b = TestNode::start_args(&["--join-key", "field-team-7"]).await;
    let stranger = TestNode::start_args(&["--join-key", "another-team"]).await;
    // Only b names a; a learns b from b's join.
    let (s, e) = b
        .post("/api/v1/peers", json!({"addr": a.p2p_addr().await}))
        .await;
    assert_eq!(s, 201, "{e}");
    let (s, e) = stranger
        .post("/api/v1/peers", json!({"addr": a.p2p_addr().await}))
        .await;
    assert_eq!(s, 201, "{e}");
    a.cases_tracker().await;
    let (_, item) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "joined"}}),
        )
        .await;
    let id = item["id"].as_str().expect("id").to_string();
    b.item_when(&id, |_| true).await;
    let (_, from_b) = b
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "from b"}}),
        )
        .await;
    a.item_when(from_b["id"].as_str().expect("id"), |_| true)
        .await;
    let (_, peers) = a.get("/api/v1/peers").await;
    let ids: Vec<&str> = peers
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["peer_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![b.peer_id().await.as_str()],
        "a authorized b (and not the stranger)"
    );
    let (_, st) = stranger.get("/api/v1/status").await;
    assert_eq!(
        (st["trackers"].as_u64(), st["items"].as_u64()),
        (Some(0), Some(0)),
        "a wrong key gets nothing"
    );
}

/// A peer whose clock runs a day ahead: its future-stamped edit is not applied (it waits for
/// our clock), while changes from an honest peer keep arriving.
#[tokio::test]
async fn future_stamped_changes_wait_and_nothing_else_stalls() {
    let a = TestNode::start().await;
    let ahead = TestNode::start_args(&["--clock-offset-ms", "86400000"]).await;
    let honest = TestNode::start().await;
    a.pair(&ahead).await;
    a.pair(&honest).await;
    a.cases_tracker().await;
    let (_, item) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "shared"}}),
        )
        .await;
    let id = item["id"].as_str().expect("id").to_string();
    ahead.item_when(&id, |_| true).await;
    honest.item_when(&id, |_| true).await;

    let (s, _) = ahead
        .patch(
            &format!("/api/v1/items/{id}"),
            json!({"fields": {"status": "closed"}}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, later) = honest
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "from the honest peer"}}),
        )
        .await;
    // The honest change arrives...
    a.item_when(later["id"].as_str().expect("id"), |_| true)
        .await;
    // ...and so does an honest edit of the very item the skewed peer changed.
    honest
        .patch(
            &format!("/api/v1/items/{id}"),
            json!({"fields": {"age": 4}}),
        )
        .await;
    let now = a.item_when(&id, |i| i["fields"]["age"] == 4).await;
    assert!(
        now["fields"].get("status").is_none(),
        "a future-stamped edit was applied early: {now}"
    );
    // The skewed peer is flagged in a's status and sync log.
    let ahead_id = ahead.peer_id().await;
    let (_, peers) = a.get("/api/v1/peers").await;
    let flagged = peers
        .as_array()
        .and_then(|p| p.iter().find(|p| p["peer_id"] == ahead_id.as_str()))
        .expect("the skewed peer in a's list");
    assert!(
        flagged["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("clock skew")),
        "{flagged}"
    );
    let (_, log) = a.get(&format!("/api/v1/log?peer={ahead_id}")).await;
    assert!(
        log.as_array().is_some_and(|l| l.iter().any(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("clock skew")))),
        "{log}"
    );
}

/// Two nodes that already hold most of the same items but share no checkpoint (they were
/// unpaired, then paired again: a first contact) reconcile by range summaries: each gets what
/// the other changed meanwhile, for a small fraction of the bytes of a full transfer.
#[tokio::test]
async fn first_contact_reconciles_by_summaries_not_by_resending_everything() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    a.cases_tracker().await;
    let mut ids = Vec::new();
    // Written before pairing, so the first sync sends them in pages, not one push each.
    for n in 0..200 {
        let (s, item) = a
            .post(
                "/api/v1/trackers/cases/items",
                json!({"fields": {"name": format!("Case {n}"), "age": n}}),
            )
            .await;
        assert_eq!(s, 201, "{item}");
        ids.push(item["id"].as_str().expect("id").to_string());
    }
    a.pair(&b).await;
    eventually("b holds all 200 items", || async {
        let (_, st) = b.get("/api/v1/status").await;
        (st["items"].as_u64() == Some(200)).then_some(())
    })
    .await;
    let full_transfer = a.metric("trackersync_sync_bytes_sent").await;
    // Both speak the deflate protocol: every message went deflated, in fewer bytes.
    assert!(a.metric("trackersync_sync_messages_sent").await > 0.0);
    assert_eq!(a.metric("trackersync_sync_messages_sent_plain").await, 0.0);
    // Pages of similar items deflate to under a third (about 72 KB to 17 KB).
    let payload = a.metric("trackersync_sync_payload_bytes_sent").await;
    assert!(
        full_transfer * 3.0 < payload,
        "{payload} bytes of messages went as {full_transfer} on the wire"
    );

    a.unpair(&b).await;
    eventually("unpaired", || async {
        let (_, st) = a.get("/api/v1/status").await;
        st["peers"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    })
    .await;
    // Changes on both sides while apart.
    for id in &ids[10..12] {
        let (s, _) = a
            .patch(
                &format!("/api/v1/items/{id}"),
                json!({"fields": {"status": "closed"}}),
            )
            .await;
        assert_eq!(s, 200);
    }
    let (s, _) = b
        .patch(
            &format!("/api/v1/items/{}", ids[150]),
            json!({"fields": {"age": 99}}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, fresh) = b
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "New on b"}}),
        )
        .await;
    let fresh = fresh["id"].as_str().expect("id").to_string();
    // The same field on both sides: neither holds all of the other's changes, so each side's
    // fetch by heads gets only heads back, and then the whole document.
    let both = &ids[20];
    let mut stamped = Vec::new();
    for (node, age) in [(&a, 1000), (&b, 2000)] {
        let (s, item) = node
            .patch(
                &format!("/api/v1/items/{both}"),
                json!({"fields": {"age": age}}),
            )
            .await;
        assert_eq!(s, 200);
        stamped.push((item["updated"].as_str().expect("stamp").to_string(), age));
    }
    // The two nodes are apart, so b's write is not causally after a's: within the same
    // millisecond their stamps can tie on time and the node id decides. The winner is the
    // write with the highest (HLC, node); stamps sort in that order as strings.
    stamped.sort();
    let (loser, winner) = (stamped[0].1, stamped[1].1);

    let before = a.metric("trackersync_sync_bytes_sent").await;
    a.pair(&b).await;
    for id in &ids[10..12] {
        b.item_when(id, |i| i["fields"]["status"] == "closed").await;
    }
    a.item_when(&ids[150], |i| i["fields"]["age"] == 99).await;
    a.item_when(&fresh, |_| true).await;
    // The higher-stamped write wins on both, and the other is kept as a conflict.
    for node in [&a, &b] {
        eventually("the same-field edits merged", || async {
            let (_, c) = node.get(&format!("/api/v1/items/{both}/conflicts")).await;
            let c = c.as_array()?.first()?.clone();
            (c["field"] == "age"
                && c["winner"]["value"] == winner
                && c["losers"][0]["value"] == loser)
                .then_some(())
        })
        .await;
        node.item_when(both, |i| i["fields"]["age"] == winner).await;
    }
    let (_, st) = a.get("/api/v1/status").await;
    assert_eq!(st["items"].as_u64(), Some(201));
    let resync = a.metric("trackersync_sync_bytes_sent").await - before;
    // The full transfer (about 18 KB, the items in deflated pages) against re-pairing (about
    // 4 KB: summaries and five documents).
    assert!(
        resync * 3.0 < full_transfer,
        "re-pairing sent {resync} bytes; the full transfer was {full_transfer}"
    );
}

/// (pull requests sent, pushes taken) by a node.
async fn counts(n: &TestNode) -> (f64, f64, f64) {
    (
        n.metric("trackersync_sync_pulls_sent").await,
        n.metric("trackersync_sync_pushes_taken").await,
        n.metric("trackersync_sync_pushes_from_memory").await,
    )
}

/// Live edits travel as pushes: the receiver takes each change with the notify instead of
/// pulling it (one round trip saved per change), the sender builds them from the changes in
/// memory (no feed read), and a change is not echoed back to its sender (no push it takes,
/// no pull).
#[tokio::test]
async fn live_changes_are_pushed_not_pulled() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    a.pair(&b).await;
    a.cases_tracker().await;
    let (_, item) = a
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "Amina", "age": 0}}),
        )
        .await;
    let id = item["id"].as_str().expect("id").to_string();
    b.item_when(&id, |_| true).await;
    let (a0, b0) = (counts(&a).await, counts(&b).await);
    const EDITS: u64 = 20;
    for age in 1..=EDITS {
        let (s, e) = a
            .patch(
                &format!("/api/v1/items/{id}"),
                json!({"fields": {"age": age}}),
            )
            .await;
        assert_eq!(s, 200, "{e}");
        b.item_when(&id, |i| i["fields"]["age"] == age).await;
    }
    let (a1, b1) = (counts(&a).await, counts(&b).await);
    let half = EDITS as f64 / 2.0;
    assert!(
        b1.1 - b0.1 >= half,
        "b took {} pushes for {EDITS} edits",
        b1.1 - b0.1
    );
    assert!(
        b1.0 - b0.0 < half,
        "b pulled {} times for {EDITS} edits",
        b1.0 - b0.0
    );
    assert!(
        a1.0 - a0.0 < half,
        "a pulled {} times for the echoes of {EDITS} edits",
        a1.0 - a0.0
    );
    assert_eq!(a1.1 - a0.1, 0.0, "a took pushes back for its own edits");
    assert!(
        a1.2 - a0.2 >= half,
        "a built {} of {EDITS} pushes from memory",
        a1.2 - a0.2
    );
}

/// Clocks skewed within the drift bound (seconds and minutes either way): causally ordered
/// writes still get increasing stamps on every node (no HLC goes backwards, even on a node
/// whose clock is minutes behind), each write wins over the one it saw, and all nodes end on
/// the same winner. A node decades ahead is beyond the bound: its change waits everywhere.
#[tokio::test]
async fn skewed_clocks_within_the_bound_converge_on_the_latest_write() {
    // Pairwise at most 260 s apart: within the 5-minute drift bound.
    let skews = ["2000", "-60000", "200000"];
    let mut nodes = Vec::new();
    for s in skews {
        nodes.push(TestNode::start_args(&["--clock-offset-ms", s]).await);
    }
    for i in 0..nodes.len() {
        for j in i + 1..nodes.len() {
            nodes[i].pair(&nodes[j]).await;
        }
    }
    nodes[0].cases_tracker().await;
    let (_, item) = nodes[0]
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "skewed"}}),
        )
        .await;
    let id = item["id"].as_str().expect("id").to_string();
    let mut last = item["updated"].as_str().expect("stamp").to_string();
    for round in 0..9 {
        let writer = &nodes[round % nodes.len()];
        writer
            .item_when(&id, |i| i["updated"] == last.as_str())
            .await;
        let (s, edited) = writer
            .patch(
                &format!("/api/v1/items/{id}"),
                json!({"fields": {"age": round}}),
            )
            .await;
        assert_eq!(s, 200, "{edited}");
        let stamp = edited["updated"].as_str().expect("stamp").to_string();
        assert!(
            stamp > last,
            "round {round}: stamp {stamp} is not after the write it saw ({last})"
        );
        last = stamp;
    }
    for n in &nodes {
        n.item_when(&id, |i| {
            i["fields"]["age"] == 8 && i["updated"] == last.as_str()
        })
        .await;
    }

    // Decades ahead: beyond the drift bound, its change is not applied.
    let far = TestNode::start_args(&["--clock-offset-ms", "946080000000"]).await;
    nodes[0].pair(&far).await;
    far.item_when(&id, |i| i["fields"]["age"] == 8).await;
    let (s, _) = far
        .patch(
            &format!("/api/v1/items/{id}"),
            json!({"fields": {"status": "closed"}}),
        )
        .await;
    assert_eq!(s, 200);
    let far_id = far.peer_id().await;
    crate::support::eventually("the far-ahead peer flagged", || async {
        let (_, peers) = nodes[0].get("/api/v1/peers").await;
        peers.as_array()?.iter().find(|p| {
            p["peer_id"] == far_id.as_str()
                && p["last_error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("clock skew"))
        })?;
        Some(())
    })
    .await;
    let (_, now) = nodes[0].get(&format!("/api/v1/items/{id}")).await;
    assert!(now["fields"].get("status").is_none(), "{now}");
}

/// A peer that speaks only the plain protocol (a node from before the deflate protocol)
/// still gets the feed, uncompressed: protocols are negotiated per stream.
#[tokio::test]
async fn a_peer_without_the_deflate_protocol_still_syncs() {
    use futures::StreamExt;
    use libp2p::request_response;
    use libp2p::swarm::SwarmEvent;
    use trackersync::net::wire::pb;

    let a = TestNode::start().await;
    a.cases_tracker().await;
    for n in 0..20 {
        let (s, _) = a
            .post(
                "/api/v1/trackers/cases/items",
                json!({"fields": {"name": format!("Case {n}")}}),
            )
            .await;
        assert_eq!(s, 201);
    }
    let mut old = crate::support::plain_sync_swarm();
    let (s, _) = a
        .post(
            "/api/v1/peers",
            json!({"peer_id": old.local_peer_id().to_string()}),
        )
        .await;
    assert_eq!(s, 201);
    let plain_before = a.metric("trackersync_sync_messages_sent_plain").await;
    let a_addr: libp2p::Multiaddr = a.p2p_addr().await.parse().expect("addr");
    old.dial(a_addr).expect("dial");
    let pull = crate::support::pull_from_start();
    let page = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match old.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    old.behaviour_mut()
                        .send_request(&peer_id, pull.clone().into());
                }
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                }) => return response,
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    error, ..
                }) => panic!("pull failed: {error}"),
                _ => {}
            }
        }
    })
    .await
    .expect("a page within 20 s");
    let Some(pb::response::Body::Pull(page)) = page.body else {
        panic!("not a page: {page:?}");
    };
    // The tracker and its 20 items.
    assert_eq!(page.entries.len(), 21, "{} entries", page.entries.len());
    // The page went plain (the node has no other peer to write to).
    assert!(a.metric("trackersync_sync_messages_sent_plain").await > plain_before);
}
