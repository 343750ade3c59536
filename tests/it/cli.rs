//! The README quickstart, through the real CLI against a running node, and with no node running.

use crate::support::{run_cli, TestNode};

#[tokio::test]
async fn quickstart_through_the_cli() {
    let n = TestNode::start().await;
    let out = n
        .cli(&[
            "tracker",
            "create",
            "cases",
            "--field",
            "name:text",
            "--field",
            "age:number",
            "--field",
            "status:choice:open,closed",
            "--required",
            "name",
            "--json",
        ])
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        out.json()["fields"][2]["options"],
        serde_json::json!(["open", "closed"])
    );

    let out = n
        .cli(&[
            "item",
            "add",
            "cases",
            "name=Amina",
            "age=7",
            "status=open",
            "--json",
        ])
        .await;
    assert!(out.ok, "{}", out.stderr);
    let item = out.json();
    assert_eq!(item["fields"]["age"], 7);
    let display = item["display_id"].as_str().expect("display id").to_string();

    let out = n
        .cli(&["item", "set", &display, "status=closed", "age="])
        .await;
    assert!(out.ok, "{}", out.stderr);
    let got = n.cli(&["item", "get", &display, "--json"]).await.json();
    assert_eq!(
        got["fields"],
        serde_json::json!({"name": "Amina", "status": "closed"})
    );

    let list = n.cli(&["item", "list", "cases"]).await;
    assert!(
        list.stdout.contains(&display) && list.stdout.contains("status=closed"),
        "{}",
        list.stdout
    );

    assert!(n.cli(&["item", "delete", &display]).await.ok);
    let list = n.cli(&["item", "list", "cases", "--json"]).await.json();
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0));
    let list = n
        .cli(&["item", "list", "cases", "--deleted", "--json"])
        .await
        .json();
    assert_eq!(list["items"][0]["deleted"], true);
    assert!(n.cli(&["item", "restore", &display]).await.ok);

    let hist = n.cli(&["item", "history", &display, "--json"]).await.json();
    assert_eq!(hist.as_array().map(Vec::len), Some(4));
    let conflicts = n.cli(&["conflicts", &display]).await;
    assert!(
        conflicts.ok && conflicts.stdout.contains("no conflicts"),
        "{}",
        conflicts.stdout
    );
    let conflicts = n
        .cli(&["conflicts", "--tracker", "cases", "--json"])
        .await
        .json();
    assert_eq!(conflicts, serde_json::json!([]));

    let status = n.cli(&["status", "--json"]).await.json();
    assert_eq!(
        (status["trackers"].as_u64(), status["items"].as_u64()),
        (Some(1), Some(1))
    );
    let text = n.cli(&["status"]).await;
    assert!(text.stdout.contains("items    1"), "{}", text.stdout);
}

#[tokio::test]
async fn cli_errors_say_what_is_wrong() {
    let n = TestNode::start().await;
    n.cases_tracker().await;
    let cases: [(&[&str], &str); 6] = [
        (
            &["item", "add", "cases", "age=7"],
            "field \"name\" is required",
        ),
        (
            &["item", "add", "cases", "name=x", "age=seven"],
            "age is a number field",
        ),
        (
            &["item", "add", "cases", "name=x", "colour=red"],
            "unknown field \"colour\"",
        ),
        (&["item", "add", "nope", "name=x"], "no tracker \"nope\""),
        (&["item", "get", "nope-1"], "no item \"nope-1\""),
        (
            &["tracker", "create", "cases", "--field", "x:text"],
            "already exists",
        ),
    ];
    for (args, expect) in cases {
        let out = n.cli(args).await;
        assert!(!out.ok, "{args:?} should fail");
        assert!(out.stderr.contains(expect), "{args:?}: {}", out.stderr);
    }
}

/// With no node running, commands work on the data directory directly (offline editing), and a
/// node started later sees the changes.
#[tokio::test]
async fn cli_edits_offline_when_no_node_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("offline");
    let init = run_cli(&dir, &["init", "--json"]).await;
    assert!(init.ok, "{}", init.stderr);
    let node_id = init.json()["node_id"]
        .as_str()
        .expect("node id")
        .to_string();
    assert!(
        run_cli(
            &dir,
            &[
                "tracker",
                "create",
                "inv",
                "--field",
                "what:text",
                "--field",
                "qty:number"
            ]
        )
        .await
        .ok
    );
    let added = run_cli(
        &dir,
        &["item", "add", "inv", "what=tents", "qty=12", "--json"],
    )
    .await;
    assert!(added.ok, "{}", added.stderr);
    assert_eq!(added.json()["origin"], node_id.as_str());

    let n = TestNode::start_in(&dir).await;
    let (_, page) = n.get("/api/v1/trackers/inv/items").await;
    assert_eq!(
        page["items"][0]["fields"],
        serde_json::json!({"what": "tents", "qty": 12})
    );
    let (_, status) = n.get("/api/v1/status").await;
    assert_eq!(status["node_id"], node_id.as_str(), "identity is kept");
}

#[tokio::test]
async fn cli_without_data_dir_explains_how_to_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = run_cli(&tmp.path().join("missing"), &["status"]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("trackersync serve"), "{}", out.stderr);
}
