//! Three trackersync nodes in one process, each with its own store, synced over real libp2p
//! connections on loopback in a chain A - B - C. Every node edits, including the same field
//! of the same item at nearly the same moment; all three converge to identical items, and the
//! losing value is listed as a conflict.
//!
//! Run: `cargo run --example three_nodes`

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use trackersync::config::Config;
use trackersync::model::{ConflictPolicy, FieldDef, FieldType};
use trackersync::node::Node;
use trackersync::peer::PeerConfig;

fn field(name: &str, ty: FieldType, options: &[&str]) -> FieldDef {
    FieldDef {
        name: name.into(),
        ty,
        label: name.into(),
        required: false,
        options: options.iter().map(|s| s.to_string()).collect(),
    }
}

fn fields(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

async fn start(dir: &std::path::Path) -> Result<Node> {
    let mut config = Config::new(dir.to_path_buf());
    config.api_addr = "127.0.0.1:0".parse()?;
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    config.mdns = false;
    Node::start(config).await
}

/// `/ip4/127.0.0.1/tcp/<port>/p2p/<peer id>` of a started node.
async fn address(node: &Node) -> Result<String> {
    let net = node.info().net.clone().context("node has no network")?;
    for _ in 0..500 {
        if let Some(a) = net.listen_addrs().await.first() {
            return Ok(format!("{a}/p2p/{}", node.info().peer_id));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("node did not start listening")
}

/// Authorize each other both ways.
async fn pair(x: &Node, y: &Node) -> Result<()> {
    for (from, to) in [(x, y), (y, x)] {
        let mut peer = PeerConfig::new(to.info().peer_id.to_string());
        peer.addrs.push(address(to).await?);
        from.info()
            .net
            .clone()
            .context("no network")?
            .add_peer(peer)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Every node's items, as comparable JSON.
fn snapshot(node: &Node) -> Result<Vec<Value>> {
    let (items, _) = node.repo().list_items("cases", None, 1000, None)?;
    Ok(items
        .into_iter()
        .map(|i| json!({"id": i.id, "fields": i.fields, "deleted": i.deleted}))
        .collect())
}

#[tokio::main]
async fn main() -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("trackersync-example-{}", std::process::id()));
    let (a, b, c) = (
        start(&tmp.join("a")).await?,
        start(&tmp.join("b")).await?,
        start(&tmp.join("c")).await?,
    );
    pair(&a, &b).await?;
    pair(&b, &c).await?;
    println!("nodes A, B, C started; paired A-B and B-C (A and C are not connected)");

    let tracker = a.repo().create_tracker(
        "cases",
        vec![
            field("name", FieldType::Text, &[]),
            field("status", FieldType::Choice, &["open", "closed"]),
            field("age", FieldType::Number, &[]),
        ],
        ConflictPolicy::Newer,
    )?;
    // Wait until the schema has reached C before C writes to it.
    wait_for(|| c.repo().tracker("cases").is_ok()).await?;

    let on_a = a
        .repo()
        .create_item("cases", fields(json!({"name": "Amina", "status": "open"})))?;
    c.repo()
        .create_item("cases", fields(json!({"name": "Kofi", "age": 9})))?;
    let id = on_a.id.to_string();
    wait_for(|| c.repo().item(&id).is_ok()).await?;
    // Concurrent edits of one field on A and C (C writes last), and a different field on B.
    a.repo()
        .update_item(&id, fields(json!({"status": "closed"})))?;
    c.repo()
        .update_item(&id, fields(json!({"status": "open"})))?;
    b.repo().update_item(&id, fields(json!({"age": 7})))?;

    let started = Instant::now();
    wait_for(|| {
        let (sa, sb, sc) = (snapshot(&a), snapshot(&b), snapshot(&c));
        matches!((&sa, &sb, &sc), (Ok(x), Ok(y), Ok(z)) if x.len() == 2 && x == y && y == z
            && x.iter().any(|i| i["fields"]["age"] == 7))
    })
    .await?;
    println!(
        "converged in {:?}: tracker {} holds {} items on every node",
        started.elapsed(),
        tracker.name,
        snapshot(&a)?.len()
    );
    for item in snapshot(&b)? {
        println!("  {}", item["fields"]);
    }
    for conflict in b.repo().item_conflicts(&id)? {
        println!(
            "  conflict on {:?}: {} won ({}), lost: {:?}",
            conflict.field,
            conflict.winner.value.clone().unwrap_or(Value::Null),
            conflict.winner.hlc,
            conflict
                .losers
                .iter()
                .map(|l| l.value.clone())
                .collect::<Vec<_>>()
        );
    }
    for n in [a, b, c] {
        n.shutdown().await?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

async fn wait_for(mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nodes did not converge within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
