//! A full disk (issue 7): a node whose data directory fills up refuses writes with a clear
//! error, keeps serving reads, never acknowledges a write it could not make durable, takes
//! writes again by itself once there is room, and starts on a full disk with nothing lost.
//! The data directory lives on a small tmpfs the test mounts (CI runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value as Json};

use crate::support::{eventually, TestNode};

/// A tmpfs mounted for the test, unmounted when dropped (before its parent directory goes).
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount(bytes: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = dir.path().join("disk");
        std::fs::create_dir(&at).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at, dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Create items with bulky notes until the node refuses one; returns the acknowledged ids
/// and the refusal.
async fn fill(node: &TestNode, tag: &str) -> (Vec<String>, Json) {
    let notes = "x".repeat(4000);
    let mut acked = Vec::new();
    for i in 0..10_000 {
        let (s, body) = node
            .post(
                "/api/v1/trackers/cases/items",
                json!({"fields": {"name": format!("{tag}{i}"), "notes": notes}}),
            )
            .await;
        if s != 201 {
            assert_eq!(s, 503, "a full disk is a 503: {body}");
            return (acked, body);
        }
        acked.push(body["id"].as_str().expect("id").to_string());
    }
    panic!("the disk never filled up");
}

fn write_file(path: &Path, bytes: usize) {
    std::fs::write(path, vec![0u8; bytes]).expect("filler");
}

#[tokio::test]
async fn a_full_disk_refuses_writes_keeps_reads_and_loses_nothing() {
    if !crate::support::is_root() {
        eprintln!("not run: this test needs root (CI runs as root)");
        return;
    }
    let disk = Tmpfs::mount(8 * 1024 * 1024);
    let filler = disk.0.join("filler");
    write_file(&filler, 2_500_000);
    let dir = disk.0.join("node");
    let mut node = TestNode::start_in(&dir).await;
    assert!(
        dir.join("reserve").exists(),
        "the node sets space aside for starting on a full disk"
    );
    let (s, t) = node
        .post(
            "/api/v1/trackers",
            json!({"name": "cases", "fields": [
                {"name": "name", "type": "text"},
                {"name": "notes", "type": "longtext"},
            ]}),
        )
        .await;
    assert_eq!(s, 201, "{t}");

    // Full: a clear refusal; reads still answer.
    let (mut acked, refusal) = fill(&node, "a").await;
    assert!(!acked.is_empty());
    assert_eq!(refusal["error"]["code"], "storage_unavailable", "{refusal}");
    assert!(
        refusal["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("No space left")),
        "{refusal}"
    );
    let (s, item) = node.get(&format!("/api/v1/items/{}", acked[0])).await;
    assert_eq!((s, &item["fields"]["name"]), (200, &json!("a0")));

    // Room again: the node reopens its store by itself and takes writes.
    std::fs::remove_file(&filler).expect("free space");
    let id = eventually("writes accepted again", || async {
        let res = node
            .http
            .post(format!("{}/api/v1/trackers/cases/items", node.base))
            .bearer_auth(&node.token)
            .json(&json!({"fields": {"name": "after"}}))
            .send()
            .await
            .ok()?;
        if res.status().as_u16() != 201 {
            return None;
        }
        let item: Json = res.json().await.ok()?;
        item["id"].as_str().map(str::to_string)
    })
    .await;
    acked.push(id);

    // Full again, killed, restarted on the full disk: it starts (the reserve makes room to
    // open the store) and every acknowledged write is there.
    let (more, _) = fill(&node, "b").await;
    acked.extend(more);
    node.kill().await;
    let node = TestNode::start_in(&dir).await;
    for id in &acked {
        let (s, item) = node.get(&format!("/api/v1/items/{id}")).await;
        assert_eq!(s, 200, "acknowledged item {id} lost: {item}");
    }
    // Nothing else but the two refused writes, which were never acknowledged and may or may
    // not have reached the disk.
    let (_, st) = node.get("/api/v1/status").await;
    let items = st["items"].as_u64().expect("items") as usize;
    assert!(
        (acked.len()..=acked.len() + 2).contains(&items),
        "{items} items for {} acknowledged writes",
        acked.len()
    );
}
