//! Sync management (issue 4): schedules, one-shot sync and the sync log, on real nodes.

use serde_json::json;

use crate::support::{eventually, TestNode};

/// Authorize `b` on `a` with a schedule.
async fn add_with_schedule(a: &TestNode, b: &TestNode, schedule: &str) {
    let (s, e) = a
        .post(
            "/api/v1/peers",
            json!({"addr": b.p2p_addr().await, "schedule": schedule}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
}

/// One peer's entry in a node's status.
async fn peer_status(n: &TestNode, peer: &str) -> serde_json::Value {
    let (_, st) = n.get("/api/v1/status").await;
    st["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["peer_id"] == peer))
        .cloned()
        .unwrap_or_else(|| panic!("{peer} not in status: {st}"))
}

async fn new_item(n: &TestNode, name: &str) -> String {
    let (s, item) = n
        .post(
            "/api/v1/trackers/cases/items",
            json!({"fields": {"name": name}}),
        )
        .await;
    assert_eq!(s, 201, "{item}");
    item["id"].as_str().expect("id").to_string()
}

/// Peers on a `manual` schedule exchange nothing on their own; `trackersync sync` moves
/// everything both ways, reports what it did, exits 0, and the sync log records it on both
/// nodes.
#[tokio::test]
async fn manual_peers_sync_only_on_request_and_the_log_records_it() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    let control = TestNode::start().await;
    add_with_schedule(&a, &b, "manual").await;
    add_with_schedule(&b, &a, "manual").await;
    a.pair(&control).await;
    a.cases_tracker().await;
    let first = new_item(&a, "Amina").await;
    // The control (continuous) has it; by then b would too, were it syncing on its own.
    control.item_when(&first, |_| true).await;
    assert_eq!(b.get(&format!("/api/v1/items/{first}")).await.0, 404);

    // a's status for b: both documents wait to be sent, nothing was ever sent.
    let b_id = b.peer_id().await;
    let pb = peer_status(&a, &b_id).await;
    assert_eq!(
        (pb["waiting"].as_u64(), &pb["last_sent"]),
        (Some(2), &json!(null)),
        "{pb}"
    );

    let a_id = a.peer_id().await;
    let out = b.cli(&["sync", &a_id, "--json"]).await;
    assert!(out.ok, "{}\n{}", out.stdout, out.stderr);
    let summary = out.json();
    // The tracker and the item, applied before the command returned.
    assert_eq!(summary["received"], 2, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(b.get(&format!("/api/v1/items/{first}")).await.0, 200);
    let pb = peer_status(&a, &b_id).await;
    assert_eq!(pb["waiting"].as_u64(), Some(0), "{pb}");
    // Idle again: no pull under way on b.
    let pa = peer_status(&b, &a.peer_id().await).await;
    assert_eq!(pa["receiving"].as_u64(), Some(0), "{pa}");
    assert!(pb["last_sent"].is_string(), "{pb}");

    // Changes made on b go to a with the next one-shot sync (from either side).
    let from_b = new_item(&b, "Written on b").await;
    let out = b.cli(&["sync", "--json"]).await;
    assert!(out.ok, "{}\n{}", out.stdout, out.stderr);
    // Sent: what a pulled from b during this sync (b's new item, unless a's pull from the
    // first sync was still running and took it then).
    assert_eq!(out.json()["errors"], 0, "{}", out.stdout);
    a.item_when(&from_b, |_| true).await;

    // The log, newest first: the one-shot sessions on b; the pull b made, on a.
    let out = b.cli(&["log", "--json"]).await;
    assert!(out.ok, "{}", out.stderr);
    let log = out.json();
    let manual: Vec<_> = log
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["trigger"] == "manual")
        .collect();
    assert_eq!(manual.len(), 2, "{log}");
    assert_eq!(manual[1]["received"].as_u64(), Some(2), "{log}");
    assert!(manual
        .iter()
        .all(|e| e["result"] == "ok" && e["peer"] == a_id.as_str()));
    assert!(manual[0]["id"].as_u64() > manual[1]["id"].as_u64());
    let (s, a_log) = a.get(&format!("/api/v1/log?peer={b_id}")).await;
    assert_eq!(s, 200);
    assert!(
        a_log
            .as_array()
            .expect("array")
            .iter()
            .any(|e| e["direction"] == "sent" && e["sent"].as_u64() >= Some(2)),
        "{a_log}"
    );
    // The log never names the API token or keys.
    let token = std::fs::read_to_string(a.dir.join("api-token")).expect("token");
    assert!(!a_log.to_string().contains(token.trim()));
}

/// A one-shot sync with a peer nobody added fails clearly, from the CLI and the API; bad
/// log queries are refused.
#[tokio::test]
async fn one_shot_sync_and_log_refuse_bad_requests() {
    let a = TestNode::start().await;
    let stranger = TestNode::start().await;
    let id = stranger.peer_id().await;
    let out = a.cli(&["sync", &id]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("add it first"), "{}", out.stderr);
    let (s, e) = a
        .post("/api/v1/sync", json!({"peer": "not-a-peer-id"}))
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("invalid_sync")),
        "{e}"
    );
    let (s, e) = a.post("/api/v1/sync", json!({"peers": []})).await;
    assert_eq!(s, 400, "{e}");
    let (s, e) = a.post("/api/v1/sync", json!({})).await;
    assert_eq!(s, 400, "no peers at all: {e}");
    let (s, e) = a.get("/api/v1/log?since=yesterday").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("invalid_since"))
    );
    let (s, _) = a.get("/api/v1/log?limit=0").await;
    assert_eq!(s, 400);
    let (s, _) = a.get("/api/v1/log?color=blue").await;
    assert_eq!(s, 400);
    let (s, log) = a.get("/api/v1/log").await;
    assert_eq!((s, log), (200, json!([])));

    // An authorized peer that is down: the sync fails, says why, and the log records it.
    let mut gone = TestNode::start().await;
    let gone_addr = gone.p2p_addr().await;
    gone.kill().await;
    let (s, e) = a.post("/api/v1/peers", json!({"addr": gone_addr})).await;
    assert_eq!(s, 201, "{e}");
    let gone_id = gone_addr.rsplit('/').next().expect("peer id").to_string();
    let out = a.cli(&["sync", &gone_id]).await;
    assert!(!out.ok, "{}", out.stdout);
    assert!(out.stdout.contains("errors 1"), "{}", out.stdout);
    let (_, log) = a.get(&format!("/api/v1/log?peer={gone_id}")).await;
    let entry = log
        .as_array()
        .and_then(|l| l.iter().find(|e| e["trigger"] == "manual"))
        .cloned()
        .unwrap_or_else(|| panic!("no manual entry: {log}"));
    assert_eq!(entry["result"], "error", "{entry}");
    assert!(entry["message"].as_str().is_some_and(|m| !m.is_empty()));
}

/// An interval peer syncs at once when its run is due (a first run, or one missed while the
/// node was down), then waits for the next run: later changes do not flow live.
#[tokio::test]
async fn interval_peers_run_when_due_and_not_live() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    let control = TestNode::start().await;
    a.cases_tracker().await;
    let early = new_item(&a, "Before pairing").await;
    add_with_schedule(&a, &b, "30m").await;
    add_with_schedule(&b, &a, "30m").await;
    a.pair(&control).await;
    // Never ran before: due now.
    b.item_when(&early, |_| true).await;
    let late = new_item(&a, "After the run").await;
    control.item_when(&late, |_| true).await;
    assert_eq!(b.get(&format!("/api/v1/items/{late}")).await.0, 404);
    eventually("a scheduled run in b's log", || async {
        let (_, log) = b.get("/api/v1/log").await;
        log.as_array()?
            .iter()
            .any(|e| e["trigger"] == "scheduled" && e["received"].as_u64() >= Some(2))
            .then_some(())
    })
    .await;
}

/// A share policy: only the named trackers are sent to the peer or taken from it; the rest
/// never reach it (checked against a control node that gets everything). Widening the
/// policy back-fills the tracker on the next sync.
#[tokio::test]
async fn a_share_policy_limits_what_moves_and_widening_it_back_fills() {
    let a = TestNode::start().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let b_dir = tmp.path().join("b");
    let mut b = TestNode::start_in(&b_dir).await;
    let control = TestNode::start().await;
    a.cases_tracker().await;
    let (s, e) = a
        .post(
            "/api/v1/trackers",
            json!({"name": "secret", "fields": [{"name": "name", "type": "text"}]}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let (s, secret) = a
        .post(
            "/api/v1/trackers/secret/items",
            json!({"fields": {"name": "Hidden"}}),
        )
        .await;
    assert_eq!(s, 201, "{secret}");
    let secret = secret["id"].as_str().expect("id").to_string();
    let case = new_item(&a, "Shared case").await;

    let (s, e) = a
        .post(
            "/api/v1/peers",
            json!({"addr": b.p2p_addr().await, "trackers": ["cases"]}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    assert_eq!(e["trackers"], json!(["cases"]));
    let (s, e) = b
        .post("/api/v1/peers", json!({"addr": a.p2p_addr().await}))
        .await;
    assert_eq!(s, 201, "{e}");
    a.pair(&control).await;
    b.item_when(&case, |_| true).await;
    control.item_when(&secret, |_| true).await;
    assert_eq!(b.get(&format!("/api/v1/items/{secret}")).await.0, 404);
    assert_eq!(b.get("/api/v1/trackers/secret").await.0, 404);
    // Not in b's store either: stop b and read its sled store directly. (Stopped, not killed:
    // a received change is visible before it is durable, so a kill could take the case.)
    assert!(b.terminate().await.success());
    {
        let store = trackersync::store::Store::open(&b_dir.join("db")).expect("b's store");
        let secret_id: uuid::Uuid = secret.parse().expect("uuid");
        assert!(store.doc_meta(secret_id).expect("read").is_none());
        assert!(store.tracker_by_name("secret").expect("read").is_none());
        let case_id: uuid::Uuid = case.parse().expect("uuid");
        assert!(store.doc_meta(case_id).expect("read").is_some());
    }
    let b = TestNode::start_in(&b_dir).await;
    // A one-shot sync naming a tracker checks it is shared.
    let b_id = b.peer_id().await;
    let out = a.cli(&["sync", &b_id, "--tracker", "secret"]).await;
    assert!(
        !out.ok && out.stderr.contains("not shared"),
        "{}",
        out.stderr
    );
    let out = a.cli(&["sync", &b_id, "--tracker", "nosuch"]).await;
    assert!(
        !out.ok && out.stderr.contains("no tracker"),
        "{}",
        out.stderr
    );
    let out = a
        .cli(&["sync", &b_id, "--tracker", "cases", "--json"])
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.json()["tracker"], "cases");
    let pb = peer_status(&a, &b_id).await;
    let by_tracker = pb["last_sync_by_tracker"].as_object().expect("map").clone();
    assert_eq!(
        by_tracker.keys().collect::<Vec<_>>(),
        vec!["cases"],
        "only shared trackers: {pb}"
    );

    // b writes to a tracker a does not take from it, then to one it does.
    let (s, e) = b
        .post(
            "/api/v1/trackers",
            json!({"name": "notes", "fields": [{"name": "name", "type": "text"}]}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let (_, note) = b
        .post(
            "/api/v1/trackers/notes/items",
            json!({"fields": {"name": "b's own"}}),
        )
        .await;
    let note = note["id"].as_str().expect("id").to_string();
    let later_case = new_item(&b, "Case from b").await;
    a.item_when(&later_case, |_| true).await;
    assert_eq!(a.get(&format!("/api/v1/items/{note}")).await.0, 404);

    // Widen the policy: the secret tracker back-fills.
    let (s, e) = a
        .patch(
            &format!("/api/v1/peers/{b_id}"),
            json!({"trackers": ["cases", "secret"]}),
        )
        .await;
    assert_eq!(s, 200, "{e}");
    b.item_when(&secret, |i| i["fields"]["name"] == "Hidden")
        .await;
    assert_eq!(a.get(&format!("/api/v1/items/{note}")).await.0, 404);
    // And `null` shares everything again, notes included.
    let (s, e) = a
        .patch(&format!("/api/v1/peers/{b_id}"), json!({"trackers": null}))
        .await;
    assert_eq!((s, &e["trackers"]), (200, &json!(null)), "{e}");
    a.item_when(&note, |_| true).await;
}

/// Allowed operations: a peer that may create and update but not delete has its deletes
/// refused (not applied, not retried, visible in the log) while everything else it sends
/// still applies.
#[tokio::test]
async fn a_peer_without_delete_rights_has_its_deletes_refused_and_logged() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    let (s, e) = a
        .post(
            "/api/v1/peers",
            json!({"addr": b.p2p_addr().await, "allow": ["create", "update"]}),
        )
        .await;
    assert_eq!((s, &e["allow"]), (201, &json!(["create", "update"])), "{e}");
    let (s, e) = b
        .post("/api/v1/peers", json!({"addr": a.p2p_addr().await}))
        .await;
    assert_eq!(s, 201, "{e}");
    a.cases_tracker().await;
    let x = new_item(&a, "Keep me").await;
    let y = new_item(&a, "Edit me").await;
    b.item_when(&y, |_| true).await;

    // b deletes x, then edits y: the edit arrives, the delete is refused.
    let (s, _) = b
        .request(reqwest::Method::DELETE, &format!("/api/v1/items/{x}"), None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = b
        .patch(
            &format!("/api/v1/items/{y}"),
            json!({"fields": {"status": "closed"}}),
        )
        .await;
    assert_eq!(s, 200);
    let from_b = new_item(&b, "Created on b").await;
    a.item_when(&y, |i| i["fields"]["status"] == "closed").await;
    a.item_when(&from_b, |_| true).await;
    let (_, kept) = a.get(&format!("/api/v1/items/{x}")).await;
    assert_eq!(kept["deleted"], false, "{kept}");
    let b_id = b.peer_id().await;
    eventually("the refusal in a's log", || async {
        let (_, log) = a.get(&format!("/api/v1/log?peer={b_id}")).await;
        log.as_array()?
            .iter()
            .find(|e| e["refused"].as_u64() >= Some(1))
            .filter(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("may not delete"))
            })
            .map(|_| ())
    })
    .await;
    // A bad operation name is refused.
    let (s, e) = a
        .patch(
            &format!("/api/v1/peers/{b_id}"),
            json!({"allow": ["erase"]}),
        )
        .await;
    assert_eq!(s, 400, "{e}");
}

/// The conflict inbox lists a tracker's fields with concurrent values not reviewed yet;
/// `conflicts ack` clears them until a new concurrent write arrives. A one-shot sync that
/// creates a conflict counts it.
#[tokio::test]
async fn the_conflict_inbox_holds_unreviewed_conflicts_until_acknowledged() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    add_with_schedule(&a, &b, "manual").await;
    add_with_schedule(&b, &a, "manual").await;
    a.cases_tracker().await;
    let id = new_item(&a, "Contested").await;
    let a_id = a.peer_id().await;
    assert!(b.cli(&["sync", &a_id]).await.ok);

    // Concurrent writes to one field, then a sync: one conflict, on both nodes.
    let contest = |x: &'static str, y: &'static str| {
        let (a, b, id, a_id) = (&a, &b, id.clone(), a_id.clone());
        async move {
            for (n, v) in [(a, x), (b, y)] {
                let (s, e) = n
                    .patch(
                        &format!("/api/v1/items/{id}"),
                        json!({"fields": {"status": v}}),
                    )
                    .await;
                assert_eq!(s, 200, "{e}");
            }
            let out = b.cli(&["sync", &a_id, "--json"]).await;
            assert!(out.ok, "{}{}", out.stderr, out.stdout);
            out.json()
        }
    };
    let summary = contest("open", "closed").await;
    assert_eq!(summary["conflicts"], 1, "{summary}");
    let inbox = |n: &TestNode, all: bool| {
        let args: Vec<&str> = if all {
            vec!["conflicts", "--tracker", "cases", "--all", "--json"]
        } else {
            vec!["conflicts", "--tracker", "cases", "--json"]
        };
        let dir = n.dir.clone();
        async move {
            let out = crate::support::run_cli(&dir, &args).await;
            assert!(out.ok, "{}", out.stderr);
            out.json().as_array().expect("array").len()
        }
    };
    assert_eq!(inbox(&a, false).await, 1);
    let out = a
        .cli(&["conflicts", "ack", "--tracker", "cases", "--json"])
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.json()["acknowledged"], 1);
    assert_eq!(inbox(&a, false).await, 0);
    assert_eq!(
        inbox(&a, true).await,
        1,
        "reviewed conflicts stay listed with --all"
    );
    // b reviews nothing: its inbox still shows it.
    assert_eq!(inbox(&b, false).await, 1);

    // A new concurrent write brings the field back; acknowledging the one field clears it.
    contest("closed", "open").await;
    a.item_when(&id, |i| i["fields"]["status"].is_string())
        .await;
    eventually("the new conflict in a's inbox", || async {
        (inbox(&a, false).await == 1).then_some(())
    })
    .await;
    let out = a
        .cli(&["conflicts", "ack", &id, "--field", "status", "--json"])
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.json()["acknowledged"], 1);
    assert_eq!(inbox(&a, false).await, 0);
    let out = a.cli(&["conflicts", "ack", &id, "--field", "name"]).await;
    assert!(!out.ok, "a field without a conflict cannot be acknowledged");
}

/// Pull-only and push-only peers move data one way only.
#[tokio::test]
async fn pull_only_and_push_only_peers_move_data_one_way() {
    let a = TestNode::start().await;
    let puller = TestNode::start().await; // a takes its changes, sends it nothing
    let pushed = TestNode::start().await; // a sends it changes, takes none of its own
    let (s, e) = a
        .post(
            "/api/v1/peers",
            json!({"addr": puller.p2p_addr().await, "mode": "pull"}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let (s, e) = a
        .post(
            "/api/v1/peers",
            json!({"addr": pushed.p2p_addr().await, "mode": "push"}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    for n in [&puller, &pushed] {
        let (s, e) = n
            .post("/api/v1/peers", json!({"addr": a.p2p_addr().await}))
            .await;
        assert_eq!(s, 201, "{e}");
    }
    a.cases_tracker().await;
    let from_a = new_item(&a, "From a").await;
    // a sends to `pushed`; not to `puller`.
    pushed.item_when(&from_a, |_| true).await;
    assert_eq!(puller.get(&format!("/api/v1/items/{from_a}")).await.0, 404);
    // `pushed` writes: a does not take it. `puller` writes afterwards: a takes that.
    let from_pushed = new_item(&pushed, "From pushed").await;
    puller.cases_tracker().await;
    let from_puller = new_item(&puller, "From puller").await;
    a.item_when(&from_puller, |_| true).await;
    assert_eq!(a.get(&format!("/api/v1/items/{from_pushed}")).await.0, 404);
}

/// A read-only peer's changes are refused (and the refusal logged) while it still pulls ours.
#[tokio::test]
async fn a_read_only_peer_pulls_but_its_edits_are_refused_and_logged() {
    let a = TestNode::start().await;
    let ro = TestNode::start().await;
    let control = TestNode::start().await;
    let (s, e) = a
        .post(
            "/api/v1/peers",
            json!({"addr": ro.p2p_addr().await, "read_only": true}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let (s, e) = ro
        .post("/api/v1/peers", json!({"addr": a.p2p_addr().await}))
        .await;
    assert_eq!(s, 201, "{e}");
    a.cases_tracker().await;
    let item = new_item(&a, "Original").await;
    ro.item_when(&item, |_| true).await;
    let (s, _) = ro
        .patch(
            &format!("/api/v1/items/{item}"),
            json!({"fields": {"name": "Changed"}}),
        )
        .await;
    assert_eq!(s, 200);
    let ro_id = ro.peer_id().await;
    eventually("the refusal in a's log", || async {
        let (_, log) = a.get(&format!("/api/v1/log?peer={ro_id}")).await;
        log.as_array()?
            .iter()
            .any(|e| e["result"] == "refused")
            .then_some(())
    })
    .await;
    // a's later change still reaches ro (a control sees it first) and a kept its value.
    a.pair(&control).await;
    let later = new_item(&a, "Later").await;
    control.item_when(&later, |_| true).await;
    ro.item_when(&later, |_| true).await;
    let (_, kept) = a.get(&format!("/api/v1/items/{item}")).await;
    assert_eq!(kept["fields"]["name"], "Original");
}

/// A short interval: the peer syncs on schedule, run after run.
#[tokio::test]
async fn an_interval_peer_syncs_on_schedule() {
    let a = TestNode::start().await;
    let b = TestNode::start().await;
    add_with_schedule(&a, &b, "2s").await;
    add_with_schedule(&b, &a, "2s").await;
    a.cases_tracker().await;
    let first = new_item(&a, "First run").await;
    b.item_when(&first, |_| true).await;
    let second = new_item(&a, "A later run").await;
    b.item_when(&second, |_| true).await;
    // Each run is logged once it ends (the entry is written just after the items).
    eventually("two scheduled runs in b's log", || async {
        let (_, log) = b.get("/api/v1/log").await;
        let runs = log
            .as_array()?
            .iter()
            .filter(|e| e["trigger"] == "scheduled" && e["received"].as_u64() >= Some(1))
            .count();
        (runs >= 2).then_some(())
    })
    .await;
}

/// After a restart, a node counts the changes waiting for a peer from what that peer's last
/// pull said it holds (kept on disk), not from the start of its feed: nothing waits for a peer
/// that had everything, and a new change counts as one.
#[tokio::test]
async fn waiting_changes_after_a_restart_count_from_what_the_peer_holds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut a = TestNode::start_in(&da).await;
    let mut b = TestNode::start_in(&db).await;
    a.pair(&b).await;
    a.cases_tracker().await;
    let mut ids = Vec::new();
    for name in ["Amina", "Brahim", "Chen"] {
        ids.push(new_item(&a, name).await);
    }
    for id in &ids {
        b.item_when(id, |_| true).await;
    }
    // b restarts and pulls from its checkpoint on a: a records where that pull started.
    assert!(b.terminate().await.success());
    b = TestNode::start_in(&db).await;
    let a_id = a.peer_id().await;
    eventually(
        "b pulled a's feed to its end since it restarted",
        || async {
            peer_status(&b, &a_id).await["last_sync"]
                .is_string()
                .then_some(())
        },
    )
    .await;
    let b_id = b.peer_id().await;
    assert!(b.terminate().await.success());
    assert!(a.terminate().await.success());
    a = TestNode::start_in(&da).await;
    // b is down: nothing was served to it since a started.
    let pb = peer_status(&a, &b_id).await;
    assert_eq!(
        (pb["connected"].as_bool(), pb["waiting"].as_u64()),
        (Some(false), Some(0)),
        "{pb}"
    );
    new_item(&a, "Dalia").await;
    let pb = peer_status(&a, &b_id).await;
    assert_eq!(pb["waiting"].as_u64(), Some(1), "{pb}");
}
