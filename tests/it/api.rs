//! The local API as other programs use it: shapes, statuses and every bad-input case.

use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use serde_json::json;

use crate::support::TestNode;

#[tokio::test]
async fn items_round_trip_with_pinned_shapes() {
    let n = TestNode::start().await;
    let t = n.cases_tracker().await;
    assert_eq!(t["name"], "cases");
    assert_eq!(t["conflict_policy"], "newer");
    assert_eq!(
        t["fields"][2],
        json!({"name": "status", "type": "choice", "label": "status", "required": false, "options": ["open", "closed"]})
    );

    let (s, item) = n
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "Amina", "age": 7, "status": "open"}}),
        )
        .await;
    assert_eq!(s, 201, "{item}");
    assert_eq!(item["tracker"], t["id"]);
    assert_eq!(
        item["fields"],
        json!({"name": "Amina", "age": 7, "status": "open"})
    );
    assert_eq!(item["deleted"], false);
    let (_, status) = n.get("/api/v1/status").await;
    assert_eq!(item["origin"], status["node_id"]);
    let id = item["id"].as_str().expect("id").to_string();
    assert_eq!(
        uuid::Uuid::parse_str(&id).expect("uuid").get_version_num(),
        7
    );

    let (s, patched) = n
        .patch(
            &format!("/api/v1/items/{id}"),
            json!({"fields": {"status": "closed", "age": null}}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        patched["fields"],
        json!({"name": "Amina", "status": "closed"})
    );
    assert!(
        patched["updated"].as_str() > item["updated"].as_str(),
        "stamps sort in HLC order"
    );

    // By display id too.
    let (s, by_display) = n
        .get(&format!(
            "/api/v1/items/{}",
            item["display_id"].as_str().expect("display")
        ))
        .await;
    assert_eq!((s, &by_display["id"]), (200, &item["id"]));

    let (s, deleted) = n
        .request(Method::DELETE, &format!("/api/v1/items/{id}"), None)
        .await;
    assert_eq!((s, &deleted["deleted"]), (200, &json!(true)));
    let (_, page) = n.get("/api/v1/trackers/cases/items").await;
    assert_eq!(page, json!({"items": [], "next": null}));
    let (_, page) = n.get("/api/v1/trackers/cases/items?deleted=true").await;
    assert_eq!(page["items"][0]["id"], item["id"]);
    let (s, got) = n.get(&format!("/api/v1/items/{id}")).await;
    assert_eq!((s, &got["deleted"]), (200, &json!(true)));
    let (_, restored) = n
        .post(&format!("/api/v1/items/{id}/restore"), json!(null))
        .await;
    assert_eq!(restored["deleted"], false);

    let (_, history) = n.get(&format!("/api/v1/items/{id}/history")).await;
    let h = history.as_array().expect("array");
    assert_eq!(h.len(), 4);
    assert_eq!(h[1]["fields"], json!({"status": "closed", "age": null}));
    assert_eq!(h[2]["deleted"], true);
    assert_eq!(h[0]["node"], status["node_id"]);
    assert!(h
        .windows(2)
        .all(|w| w[0]["hlc"].as_str() < w[1]["hlc"].as_str()));

    let (s, c) = n.get(&format!("/api/v1/items/{id}/conflicts")).await;
    assert_eq!((s, c), (200, json!([])));
    let (s, c) = n.get("/api/v1/trackers/cases/conflicts").await;
    assert_eq!((s, c), (200, json!([])));
    let (_, status) = n.get("/api/v1/status").await;
    assert_eq!(
        (status["trackers"].as_u64(), status["items"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn paging_walks_every_item_once() {
    let n = TestNode::start().await;
    n.cases_tracker().await;
    for i in 0..7 {
        let (s, _) = n
            .post(
                "/api/v1/trackers/cases/items",
                json!({"fields": {"name": format!("p{i}")}}),
            )
            .await;
        assert_eq!(s, 201);
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/trackers/cases/items?limit=3".to_string();
    loop {
        let (s, page) = n.get(&path).await;
        assert_eq!(s, 200);
        for i in page["items"].as_array().expect("items") {
            seen.push(i["fields"]["name"].as_str().expect("name").to_string());
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/api/v1/trackers/cases/items?limit=3&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, (0..7).map(|i| format!("p{i}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn schema_grows_and_policy_changes() {
    let n = TestNode::start().await;
    n.cases_tracker().await;
    let (s, t) = n
        .post(
            "/api/v1/trackers/cases/fields",
            json!({"name": "where", "type": "location"}),
        )
        .await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["fields"].as_array().map(Vec::len), Some(4));
    assert_eq!(t["fields"][3]["name"], "where", "new fields come last");
    let (s, item) = n
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "x", "where": {"lat": 1.5, "lon": 2}}}),
        )
        .await;
    assert_eq!(
        (s, &item["fields"]["where"]),
        (201, &json!({"lat": 1.5, "lon": 2.0}))
    );
    let (s, e) = n
        .post(
            "/api/v1/trackers/cases/fields",
            json!({"name": "where", "type": "text"}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("duplicate_field"))
    );
    let (s, t) = n
        .patch(
            "/api/v1/trackers/cases",
            json!({"conflict_policy": "origin"}),
        )
        .await;
    assert_eq!((s, &t["conflict_policy"]), (200, &json!("origin")));
    let (_, list) = n.get("/api/v1/trackers").await;
    assert_eq!(list[0]["conflict_policy"], "origin");
}

/// Every bad input gets the right 4xx with a JSON error, and changes nothing.
#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let n = TestNode::start().await;
    let tracker = n.cases_tracker().await;
    let (_, item) = n
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "A"}}),
        )
        .await;
    let id = item["id"].as_str().expect("id").to_string();
    let item_path = format!("/api/v1/items/{id}");
    // A stored document that is not an item.
    let tracker_as_item = format!("/api/v1/items/{}", tracker["id"].as_str().expect("id"));

    let cases: Vec<(Method, String, Option<serde_json::Value>, u16, &str)> = vec![
        (
            Method::POST,
            "/api/v1/trackers/nope/items".into(),
            Some(json!({"fields": {"name": "x"}})),
            404,
            "tracker_not_found",
        ),
        (
            Method::GET,
            "/api/v1/items/01234567-89ab-7def-8123-456789abcdef".into(),
            None,
            404,
            "item_not_found",
        ),
        (
            Method::GET,
            "/api/v1/items/not-an-item".into(),
            None,
            404,
            "item_not_found",
        ),
        (
            Method::GET,
            tracker_as_item.clone(),
            None,
            404,
            "item_not_found",
        ),
        (
            Method::PATCH,
            tracker_as_item.clone(),
            Some(json!({"fields": {"name": "x"}})),
            404,
            "item_not_found",
        ),
        (
            Method::POST,
            "/api/v1/trackers/cases/items".into(),
            Some(json!({"fields": {"name": "x", "colour": "red"}})),
            400,
            "unknown_field",
        ),
        (
            Method::POST,
            "/api/v1/trackers/cases/items".into(),
            Some(json!({"fields": {"name": "x", "age": "seven"}})),
            400,
            "invalid_value",
        ),
        (
            Method::POST,
            "/api/v1/trackers/cases/items".into(),
            Some(json!({"fields": {"name": "x", "status": "maybe"}})),
            400,
            "invalid_value",
        ),
        (
            Method::POST,
            "/api/v1/trackers/cases/items".into(),
            Some(json!({"fields": {"age": 3}})),
            400,
            "missing_field",
        ),
        (
            Method::POST,
            "/api/v1/trackers/cases/items".into(),
            Some(json!({"fields": {"name": "x"}, "extra": 1})),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            "/api/v1/trackers/cases/items".into(),
            Some(json!({"fields": "name=x"})),
            400,
            "invalid_request",
        ),
        (
            Method::PATCH,
            item_path.clone(),
            Some(json!({"fields": {"name": null}})),
            400,
            "missing_field",
        ),
        (
            Method::PATCH,
            item_path.clone(),
            Some(json!({"fields": {"age": 1, "nope": 2}})),
            400,
            "unknown_field",
        ),
        (
            Method::POST,
            "/api/v1/trackers".into(),
            Some(json!({"name": "cases", "fields": []})),
            409,
            "duplicate_tracker",
        ),
        (
            Method::POST,
            "/api/v1/trackers".into(),
            Some(json!({"name": "t2", "fields": [{"name": "a", "type": "colour"}]})),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            "/api/v1/trackers".into(),
            Some(json!({"name": "t2", "fields": [{"name": "a", "type": "choice"}]})),
            400,
            "invalid_value",
        ),
        (
            Method::POST,
            "/api/v1/trackers".into(),
            Some(json!({"name": "bad name!", "fields": []})),
            400,
            "invalid_request",
        ),
        (
            Method::POST,
            "/api/v1/trackers".into(),
            Some(
                json!({"name": "t3", "fields": [{"name": "a", "type": "text"}, {"name": "a", "type": "text"}]}),
            ),
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/api/v1/trackers/cases/items?limit=zero".into(),
            None,
            400,
            "invalid_query",
        ),
        (
            Method::GET,
            "/api/v1/trackers/cases/items?limit=0".into(),
            None,
            400,
            "invalid_query",
        ),
        (
            Method::GET,
            "/api/v1/trackers/cases/items?deleted=maybe".into(),
            None,
            400,
            "invalid_query",
        ),
        (
            Method::POST,
            format!("{item_path}/conflicts/restore"),
            Some(json!({"field": "name", "hlc": "garbage"})),
            400,
            "invalid_request",
        ),
        (
            Method::GET,
            "/api/v1/nowhere".into(),
            None,
            404,
            "not_found",
        ),
        (
            Method::PUT,
            item_path.clone(),
            Some(json!({})),
            405,
            "method_not_allowed",
        ),
        (
            Method::POST,
            "/api/v1/export".into(),
            Some(json!({"tracker": "cases"})),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/api/v1/export".into(),
            Some(json!({"trackers": ["nope"]})),
            404,
            "tracker_not_found",
        ),
        (
            Method::POST,
            "/api/v1/export".into(),
            Some(json!({"for_peer": "ghost"})),
            404,
            "peer_not_found",
        ),
        (
            Method::POST,
            "/api/v1/import".into(),
            Some(json!({"not": "a bundle"})),
            400,
            "bad_bundle",
        ),
        (
            Method::GET,
            "/api/v1/log?limit=many".into(),
            None,
            400,
            "invalid_query",
        ),
        (
            Method::POST,
            "/api/v1/peers".into(),
            Some(json!({"addr": "/ip4/127.0.0.1/tcp/1"})),
            400,
            "invalid_peer",
        ),
        (
            Method::POST,
            "/api/v1/peers".into(),
            Some(json!({"peer_id": "not-a-peer"})),
            400,
            "invalid_peer",
        ),
        (
            Method::POST,
            "/api/v1/peers".into(),
            Some(
                json!({"peer_id": "12D3KooWQmzgTPy77WHNWQmvm1XXqacT5D8e2szXX5XYzAxVjUmp", "mode": "sideways"}),
            ),
            400,
            "invalid_peer",
        ),
        (
            Method::DELETE,
            "/api/v1/peers/12D3KooWQmzgTPy77WHNWQmvm1XXqacT5D8e2szXX5XYzAxVjUmp".into(),
            None,
            404,
            "peer_not_found",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (s, e) = n.request(method.clone(), &path, body.clone()).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path} {body:?}: {e}"
        );
        assert!(e["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }

    // Malformed JSON, raw.
    let res = n
        .http
        .post(format!("{}/api/v1/trackers/cases/items", n.base))
        .bearer_auth(&n.token)
        .body("{\"fields\": {\"name\": ")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status().as_u16(), 400);
    let e: serde_json::Value = res.json().await.expect("json error");
    assert_eq!(e["error"]["code"], "malformed_json");

    // Oversized body, on its own connection: the node answers 413 without reading the rest and
    // closes the connection, which a pooled client could otherwise reuse.
    let own = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let big = json!({"fields": {"name": "x".repeat(1024 * 1024 + 64 * 1024)}});
    let res = own
        .post(format!("{}/api/v1/trackers/cases/items", n.base))
        .bearer_auth(&n.token)
        .json(&big)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status().as_u16(), 413);
    let e: serde_json::Value = res.json().await.expect("json error");
    assert_eq!(e["error"]["code"], "body_too_large");

    // Missing and wrong token.
    let res = n
        .http
        .get(format!("{}/api/v1/status", n.base))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status().as_u16(), 401);
    let res = n
        .http
        .get(format!("{}/api/v1/status", n.base))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status().as_u16(), 401);
    let e: serde_json::Value = res.json().await.expect("json error");
    assert_eq!(e["error"]["code"], "unauthorized");

    // Nothing above wrote anything: one tracker, one item, unchanged.
    let (_, status) = n.get("/api/v1/status").await;
    assert_eq!(
        (status["trackers"].as_u64(), status["items"].as_u64()),
        (Some(1), Some(1))
    );
    let (_, after) = n.get(&item_path).await;
    assert_eq!(after["fields"], item["fields"]);
    assert_eq!(after["updated"], item["updated"]);
}

#[tokio::test]
async fn events_stream_reports_each_change() {
    let n = TestNode::start().await;
    n.cases_tracker().await;
    let res = n
        .http
        .get(format!("{}/api/v1/events", n.base))
        .bearer_auth(&n.token)
        .send()
        .await
        .expect("subscribe");
    assert_eq!(res.status().as_u16(), 200);
    let mut body = res.bytes_stream();
    let (_, item) = n
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "E"}}),
        )
        .await;
    let mut buf = String::new();
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let chunk = body.next().await.expect("stream open").expect("chunk");
            buf.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(line) = buf.lines().find(|l| l.starts_with("data:")) {
                return serde_json::from_str::<serde_json::Value>(
                    line.trim_start_matches("data:").trim(),
                )
                .expect("event json");
            }
        }
    })
    .await
    .expect("an event within 10 s");
    assert_eq!(
        event,
        json!({"item": item["id"], "tracker": item["tracker"], "source": "local"})
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let n = TestNode::start().await;
    n.cases_tracker().await;
    n.post(
        "/api/v1/trackers/cases/items",
        json!({"fields": {"name": "M"}}),
    )
    .await;
    let text = n
        .http
        .get(format!("{}/metrics", n.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(text.lines().any(|l| l == "trackersync_items 1"), "{text}");
    assert!(
        text.lines().any(|l| l == "trackersync_trackers 1"),
        "{text}"
    );
    assert!(text.contains("# TYPE trackersync_api_requests counter"));
}

/// `--cache-mb` bounds the decoded documents a node keeps (half of it); evicted items read back
/// whole from the store.
#[tokio::test]
async fn the_document_cache_stays_within_its_configured_memory() {
    let n = TestNode::start_args(&["--cache-mb", "8"]).await;
    n.cases_tracker().await;
    let mut ids = Vec::new();
    for i in 0..400 {
        let (s, item) = n
            .post(
                "/api/v1/trackers/cases/items",
                json!({"fields": {"name": format!("n{i}"), "age": i}}),
            )
            .await;
        assert_eq!(s, 201, "{item}");
        ids.push(item["id"].as_str().expect("id").to_string());
    }
    let (bytes, entries) = (
        n.metric("trackersync_doc_cache_bytes").await,
        n.metric("trackersync_doc_cache_entries").await,
    );
    // Half of 8 MiB for documents; the entry used last is counted when it is let go, after
    // the eviction that made room for it.
    assert!(
        bytes > 0.0 && bytes <= (4 << 20) as f64 + 65536.0,
        "{bytes} B cached"
    );
    assert!(entries < 400.0, "{entries} documents cached");
    for (i, id) in ids.iter().enumerate() {
        let (s, item) = n.get(&format!("/api/v1/items/{id}")).await;
        assert_eq!(s, 200, "{item}");
        assert_eq!(item["fields"]["age"], json!(i), "{item}");
    }
}

/// The clock never goes backwards across a restart, even when the wall clock does.
#[tokio::test]
async fn stamps_stay_monotonic_across_restart_with_clock_set_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("n");
    let mut n = TestNode::start_in(&dir).await;
    n.cases_tracker().await;
    let (_, item) = n
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": "T"}}),
        )
        .await;
    n.kill().await;
    // Restart one hour in the past.
    let addr_file = dir.join("api-addr");
    let _ = std::fs::remove_file(&addr_file);
    let _child = tokio::process::Command::new(crate::support::BIN)
        .args(["serve", "--api", "127.0.0.1:0", "--no-mdns", "--data"])
        .arg(&dir)
        .env("TRACKERSYNC_CLOCK_OFFSET_MS", "-3600000")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let addr = crate::support::wait_for_file(&addr_file, Duration::from_secs(20)).await;
    n.base = format!("http://{}", addr.trim());
    let (s, later) = n
        .patch(
            &format!("/api/v1/items/{}", item["id"].as_str().expect("id")),
            json!({"fields": {"age": 1}}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        later["updated"].as_str() > item["updated"].as_str(),
        "{} <= {}",
        later["updated"],
        item["updated"]
    );
}
