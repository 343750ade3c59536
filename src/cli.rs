//! The command line (clap). `serve` runs the node; every other command is a client of the local
//! API (see `client`): parse, resolve, run, print.

mod client;
mod values;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use reqwest::Method;
use serde_json::{json, Value as Json};

use crate::config::{self, Config, Identity};
use crate::node::Node;
use client::Client;

#[derive(Parser, Debug)]
#[command(
    name = "trackersync",
    version,
    about = "Peer-to-peer sync node for tracker items"
)]
pub struct Cli {
    /// Data directory (node identity, API token, store).
    #[arg(long, global = true, env = "TRACKERSYNC_DATA")]
    pub data: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the data directory: node UUID, libp2p keypair, API token.
    Init(JsonFlag),
    /// Run the node: local API, store (and sync, when enabled).
    Serve(ServeArgs),
    /// Show the node's identity and counts.
    Status(JsonFlag),
    /// Create, list and change trackers.
    #[command(subcommand)]
    Tracker(TrackerCmd),
    /// Add, read, change and delete items.
    #[command(subcommand)]
    Item(ItemCmd),
    /// Show fields with concurrent values (one item, or a whole tracker), or restore a losing value.
    Conflicts(ConflictsArgs),
    /// Authorize, list, change and revoke peers.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// The sync log: one line per sync session with a peer, newest first.
    Log(LogArgs),
    /// Sync now with one peer (or every peer), whatever the schedule; prints a summary and
    /// exits non-zero if syncing with any peer failed.
    Sync(SyncArgs),
    /// Write a bundle file (tracker schemas and items) to carry to another node without a
    /// network: everything, some trackers, what changed after a checkpoint, or what a peer lacks.
    Export(ExportArgs),
    /// Apply a bundle file: verified whole first (a damaged file changes nothing), merged by
    /// the same rules as network sync; importing it again changes nothing.
    Import(ImportArgs),
    /// Fetch a tracker (schema and every item) from a peer over the network, then keep it
    /// synced per that peer's settings. The peer is a configured peer (PeerId or name) or a
    /// multiaddr ending in /p2p/<PeerId>, added with a share policy of that tracker.
    Clone(CloneArgs),
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The bundle file to write (replaced atomically).
    pub file: PathBuf,
    /// Only this tracker (name or id); repeat for more.
    #[arg(long = "tracker")]
    pub trackers: Vec<String>,
    /// Only what changed after this checkpoint (the `last_seq` an earlier export printed).
    #[arg(long, conflicts_with = "for_peer")]
    pub since: Option<u64>,
    /// Only what this peer (PeerId or name) lacks, as far as we know, within its share policy.
    #[arg(long)]
    pub for_peer: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The bundle file.
    pub file: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CloneArgs {
    /// A configured peer (PeerId or name), or a multiaddr ending in /p2p/<PeerId>.
    pub peer: String,
    /// The tracker to fetch (name or id, as the peer knows it).
    pub tracker: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The peer (PeerId); default: every peer.
    pub peer: Option<String>,
    /// A tracker that must be shared with the peer(s). The run moves every shared tracker:
    /// sync follows the node's change feed, not one tracker's.
    #[arg(long)]
    pub tracker: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    /// Only sessions with this peer (PeerId).
    #[arg(long)]
    pub peer: Option<String>,
    /// Only sessions started at or after this time (RFC 3339, e.g. 2026-11-22T10:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many entries.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    /// Authorize a peer: a multiaddr ending in /p2p/<PeerId> (or a bare PeerId found by mDNS).
    Add {
        peer: String,
        #[command(flatten)]
        settings: PeerSettings,
        /// Refuse this peer's changes; it may still pull ours.
        #[arg(long)]
        read_only: bool,
        #[arg(long)]
        json: bool,
    },
    /// List authorized peers and whether they are connected.
    List(JsonFlag),
    /// Change a peer's name, mode, schedule, share policy, allowed operations or read-only flag.
    Update {
        peer: String,
        #[command(flatten)]
        settings: PeerSettings,
        #[arg(long)]
        read_only: Option<bool>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a peer: it is disconnected at once and syncs nothing more.
    Remove { peer: String },
}

/// How to sync with a peer (unset: the default on `add`, unchanged on `update`).
#[derive(Args, Debug)]
pub struct PeerSettings {
    #[arg(long)]
    pub name: Option<String>,
    /// both (default), pull (only take its changes) or push (only send ours).
    #[arg(long)]
    pub mode: Option<String>,
    /// continuous (default), manual (only `trackersync sync`) or an interval: 30s, 15m, 2h.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Share only these trackers with the peer (comma-separated names), or `all`.
    #[arg(long, value_delimiter = ',')]
    pub trackers: Option<Vec<String>>,
    /// What the peer's changes may do to our items: create,update,delete, or `all`.
    #[arg(long, value_delimiter = ',')]
    pub allow: Option<Vec<String>>,
}

impl PeerSettings {
    /// The settings given, as fields of a peer's JSON (`all` becomes `null`).
    fn apply_to(self, body: &mut Json) {
        for (key, value) in [
            ("name", self.name),
            ("mode", self.mode),
            ("schedule", self.schedule),
        ] {
            if let Some(v) = value {
                body[key] = json!(v);
            }
        }
        for (key, list) in [("trackers", self.trackers), ("allow", self.allow)] {
            match list {
                Some(l) if l == ["all"] => body[key] = Json::Null,
                Some(l) => body[key] = json!(l),
                None => {}
            }
        }
    }
}

#[derive(Args, Debug)]
pub struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Local API address; port 0 picks a free port (written to DATA/api-addr).
    #[arg(long, default_value = config::DEFAULT_API_ADDR)]
    pub api: SocketAddr,
    /// libp2p listen address (repeatable).
    #[arg(long)]
    pub listen: Vec<Multiaddr>,
    /// Do not discover peers with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// A deployment's shared join key: nodes started with the same key authorize each other
    /// on first contact (ad-hoc LAN use). Prefer the environment variable to keep it out of
    /// process listings.
    #[arg(long, env = "TRACKERSYNC_JOIN_KEY", hide_env_values = true)]
    pub join_key: Option<String>,
    /// Memory for caches, in MiB: half for decoded documents (each holds its whole edit
    /// history), half for the store's page cache. Larger keeps more items hot.
    #[arg(
        long,
        env = "TRACKERSYNC_CACHE_MB",
        default_value_t = (crate::repo::DEFAULT_CACHE_BYTES >> 20) as u32,
        value_parser = clap::value_parser!(u32).range(8..=1_048_576)
    )]
    pub cache_mb: u32,
    /// Shift this node's clock by milliseconds (testing clock skew).
    #[arg(
        long,
        env = "TRACKERSYNC_CLOCK_OFFSET_MS",
        default_value_t = 0,
        allow_negative_numbers = true,
        hide = true
    )]
    pub clock_offset_ms: i64,
}

#[derive(Subcommand, Debug)]
pub enum TrackerCmd {
    /// Create a tracker: `--field NAME:TYPE[:OPTION,OPTION…]` for each field.
    Create {
        name: String,
        /// NAME:TYPE or NAME:choice:OPT1,OPT2 (types: text, longtext, number, boolean, date,
        /// datetime, choice, multichoice, email, url, location, user).
        #[arg(long = "field")]
        fields: Vec<String>,
        /// Fields that every item must have (repeatable).
        #[arg(long)]
        required: Vec<String>,
        /// Conflict policy: newer (most recent write wins) or origin (origin node's write wins).
        #[arg(long, default_value = "newer")]
        policy: String,
        #[arg(long)]
        json: bool,
    },
    /// List trackers.
    List(JsonFlag),
    /// Show one tracker's schema.
    Get {
        tracker: String,
        #[arg(long)]
        json: bool,
    },
    /// Add a field to a tracker (it reaches every peer).
    AddField {
        tracker: String,
        /// NAME:TYPE[:OPTIONS]
        field: String,
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Set a tracker's conflict policy: newer or origin.
    Policy { tracker: String, policy: String },
}

#[derive(Subcommand, Debug)]
pub enum ItemCmd {
    /// Add an item: FIELD=VALUE … (FIELD:=JSON for raw JSON).
    Add {
        tracker: String,
        values: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show an item (by id or display id).
    Get {
        item: String,
        #[arg(long)]
        json: bool,
    },
    /// Set fields of an item: FIELD=VALUE … (FIELD= clears).
    Set {
        item: String,
        #[arg(required = true)]
        values: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List a tracker's items.
    List {
        tracker: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Continue after this item id (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Include deleted items.
        #[arg(long)]
        deleted: bool,
        /// List every page.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete an item (a tombstone that syncs; restore undoes it).
    Delete {
        item: String,
        #[arg(long)]
        json: bool,
    },
    /// Undelete an item.
    Restore {
        item: String,
        #[arg(long)]
        json: bool,
    },
    /// Show an item's changes, oldest first.
    History {
        item: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct ConflictsArgs {
    /// An item (id or display id); omit and pass --tracker for a tracker's inbox (conflicts
    /// not reviewed yet). `ack [ITEM]` marks them reviewed (an item's, or with --tracker the
    /// whole inbox).
    pub item: Option<String>,
    /// With `ack`: the item.
    #[arg(hide = true)]
    pub target: Option<String>,
    #[arg(long)]
    pub tracker: Option<String>,
    /// With `ack ITEM`: only this field's conflict.
    #[arg(long)]
    pub field: Option<String>,
    /// The inbox with reviewed conflicts too.
    #[arg(long)]
    pub all: bool,
    /// Restore a losing value: FIELD and the loser's HLC, as shown.
    #[arg(long, num_args = 2, value_names = ["FIELD", "HLC"])]
    pub restore: Option<Vec<String>>,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: Cli) -> Result<()> {
    let data = cli.data.unwrap_or_else(config::default_data_dir);
    match cli.command {
        Command::Init(f) => init(&data, f.json),
        Command::Serve(args) => serve(data, args).await,
        cmd => {
            let client = Client::connect(&data).await?;
            let result = client_command(&client, cmd).await;
            client.close().await?;
            result
        }
    }
}

fn init(data: &std::path::Path, json: bool) -> Result<()> {
    let id = Identity::init(data)?;
    let peer = id.keypair.public().to_peer_id();
    if json {
        print_json(
            &json!({"node_id": id.node.to_string(), "peer_id": peer.to_string(), "data": data}),
        );
    } else {
        println!("node {}\npeer {}\ndata {}", id.node, peer, data.display());
    }
    Ok(())
}

async fn serve(data: PathBuf, args: ServeArgs) -> Result<()> {
    let mut config = Config::new(data.clone());
    config.api_addr = args.api;
    if !args.listen.is_empty() {
        config.listen = args.listen;
    }
    config.mdns = !args.no_mdns;
    config.join_key = args.join_key.filter(|k| !k.is_empty());
    config.cache_bytes = u64::from(args.cache_mb) << 20;
    config.clock_offset_ms = args.clock_offset_ms;
    let mut node = Node::start(config.clone()).await?;
    println!(
        "trackersync node {} (peer {})",
        node.info().node,
        node.info().peer_id
    );
    println!(
        "local API: http://{} (token in {})",
        node.api_addr(),
        data.join(config::FILE_API_TOKEN).display()
    );
    println!("data: {}", data.display());
    loop {
        tokio::select! {
            _ = wait_for_signal() => return node.shutdown().await,
            _ = node.store_recoverable() => {}
        }
        // The store failed (disk full) and there is room again: sled only recovers by
        // reopening, so restart the node on the same store and the same addresses.
        tracing::warn!("storage takes writes again: reopening the store");
        let (api, p2p) = node.listening().await;
        config.api_addr = api;
        if !p2p.is_empty() {
            config.listen = p2p;
        }
        if let Err(e) = node.shutdown().await {
            tracing::warn!(error = %e, "final flush of the failed store");
        }
        // Work still finishing on the old store (a request on the blocking pool) holds its
        // lock for a moment: retry while it says "in use".
        let mut attempt = 0;
        node = loop {
            match Node::start(config.clone()).await {
                Ok(n) => break n,
                Err(e) if attempt < 300 && e.to_string().contains("in use") => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        tracing::info!("store reopened; writes are accepted again");
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn client_command(c: &Client, cmd: Command) -> Result<()> {
    match cmd {
        Command::Init(_) | Command::Serve(_) => unreachable!("handled before connecting"),
        Command::Status(f) => {
            let s = c.get("/status").await?;
            if f.json {
                print_json(&s);
            } else {
                println!("node     {}", s["node_id"].as_str().unwrap_or(""));
                println!("peer id  {}", s["peer_id"].as_str().unwrap_or(""));
                println!("trackers {}", s["trackers"]);
                println!("items    {}", s["items"]);
                println!("clock    {}", s["clock"].as_str().unwrap_or(""));
                let addrs: Vec<&str> = s["listen_addrs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Json::as_str)
                    .collect();
                println!(
                    "listen   {}",
                    if addrs.is_empty() {
                        "-".to_string()
                    } else {
                        addrs.join(" ")
                    }
                );
                for p in s["peers"].as_array().into_iter().flatten() {
                    let name = p["name"]
                        .as_str()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default();
                    println!(
                        "peer     {}{name} {}, {} {}, last received {}, last sent {}, {} waiting to be sent{}",
                        p["peer_id"].as_str().unwrap_or(""),
                        if p["connected"].as_bool() == Some(true) {
                            "connected"
                        } else {
                            "not connected"
                        },
                        p["mode"].as_str().unwrap_or(""),
                        p["schedule"].as_str().unwrap_or(""),
                        p["last_sync"].as_str().unwrap_or("never"),
                        p["last_sent"].as_str().unwrap_or("never"),
                        p["waiting"],
                        p["last_error"]
                            .as_str()
                            .map(|e| format!(", last error: {e}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        Command::Tracker(t) => tracker_command(c, t).await?,
        Command::Item(i) => item_command(c, i).await?,
        Command::Conflicts(a) => conflicts_command(c, a).await?,
        Command::Peer(p) => peer_command(c, p).await?,
        Command::Log(a) => log_command(c, a).await?,
        Command::Sync(a) => sync_command(c, a).await?,
        Command::Export(a) => export_command(c, a).await?,
        Command::Import(a) => import_command(c, a).await?,
        Command::Clone(a) => clone_command(c, a).await?,
    }
    Ok(())
}

fn parse_field_spec(spec: &str, required: &[String], label: Option<String>) -> Result<Json> {
    let mut parts = spec.splitn(3, ':');
    let name = parts.next().unwrap_or_default();
    let Some(ty) = parts.next() else {
        bail!("--field {spec:?}: expected NAME:TYPE, for example age:number or status:choice:open,closed");
    };
    let options: Vec<&str> = parts
        .next()
        .map(|o| o.split(',').collect())
        .unwrap_or_default();
    Ok(json!({
        "name": name,
        "type": ty,
        "label": label.unwrap_or_else(|| name.to_string()),
        "required": required.iter().any(|r| r == name),
        "options": options,
    }))
}

async fn tracker_command(c: &Client, cmd: TrackerCmd) -> Result<()> {
    match cmd {
        TrackerCmd::Create {
            name,
            fields,
            required,
            policy,
            json,
        } => {
            for r in &required {
                if !fields
                    .iter()
                    .any(|f| f.split(':').next() == Some(r.as_str()))
                {
                    bail!("--required {r}: no --field named {r}");
                }
            }
            let fields = fields
                .iter()
                .map(|f| parse_field_spec(f, &required, None))
                .collect::<Result<Vec<_>>>()?;
            let t = c
                .request(
                    Method::POST,
                    "/trackers",
                    Some(json!({"name": name, "fields": fields, "conflict_policy": policy})),
                )
                .await?;
            print_tracker(&t, json);
        }
        TrackerCmd::List(f) => {
            let all = c.get("/trackers").await?;
            if f.json {
                print_json(&all);
            } else {
                for t in all.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {} fields  {}",
                        t["name"].as_str().unwrap_or(""),
                        t["fields"].as_array().map_or(0, Vec::len),
                        t["id"].as_str().unwrap_or("")
                    );
                }
            }
        }
        TrackerCmd::Get { tracker, json } => {
            print_tracker(&c.get(&format!("/trackers/{}", enc(&tracker))).await?, json)
        }
        TrackerCmd::AddField {
            tracker,
            field,
            label,
            json,
        } => {
            let f = parse_field_spec(&field, &[], label)?;
            let t = c
                .request(
                    Method::POST,
                    &format!("/trackers/{}/fields", enc(&tracker)),
                    Some(f),
                )
                .await?;
            print_tracker(&t, json);
        }
        TrackerCmd::Policy { tracker, policy } => {
            let t = c
                .request(
                    Method::PATCH,
                    &format!("/trackers/{}", enc(&tracker)),
                    Some(json!({"conflict_policy": policy})),
                )
                .await?;
            println!(
                "{}: conflict policy {}",
                t["name"].as_str().unwrap_or(""),
                t["conflict_policy"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

async fn item_command(c: &Client, cmd: ItemCmd) -> Result<()> {
    match cmd {
        ItemCmd::Add {
            tracker,
            values,
            json,
        } => {
            let t = c.get(&format!("/trackers/{}", enc(&tracker))).await?;
            let fields = values::parse_assignments(
                &values,
                t["fields"].as_array().map_or(&[], Vec::as_slice),
            )?;
            let item = c
                .request(
                    Method::POST,
                    &format!("/trackers/{}/items", enc(&tracker)),
                    Some(json!({"fields": fields})),
                )
                .await?;
            print_item(&item, json);
        }
        ItemCmd::Get { item, json } => {
            print_item(&c.get(&format!("/items/{}", enc(&item))).await?, json)
        }
        ItemCmd::Set { item, values, json } => {
            let current = c.get(&format!("/items/{}", enc(&item))).await?;
            let t = c
                .get(&format!(
                    "/trackers/{}",
                    current["tracker"].as_str().unwrap_or("")
                ))
                .await?;
            let fields = values::parse_assignments(
                &values,
                t["fields"].as_array().map_or(&[], Vec::as_slice),
            )?;
            let updated = c
                .request(
                    Method::PATCH,
                    &format!("/items/{}", enc(&item)),
                    Some(json!({"fields": fields})),
                )
                .await?;
            print_item(&updated, json);
        }
        ItemCmd::List {
            tracker,
            limit,
            after,
            deleted,
            all,
            json,
        } => {
            let mut after = after;
            let mut items = Vec::new();
            loop {
                let mut path = format!(
                    "/trackers/{}/items?limit={limit}&deleted={deleted}",
                    enc(&tracker)
                );
                if let Some(a) = &after {
                    path.push_str(&format!("&after={}", enc(a)));
                }
                let page = c.get(&path).await?;
                items.extend(page["items"].as_array().cloned().unwrap_or_default());
                match page["next"].as_str() {
                    Some(n) if all => after = Some(n.to_string()),
                    next => {
                        if json {
                            print_json(&json!({"items": items, "next": next}));
                        } else {
                            for i in &items {
                                println!("{}", item_line(i));
                            }
                            if let Some(n) = next {
                                eprintln!("more: --after {n} (or --all)");
                            }
                        }
                        break;
                    }
                }
            }
        }
        ItemCmd::Delete { item, json } => print_item(
            &c.request(Method::DELETE, &format!("/items/{}", enc(&item)), None)
                .await?,
            json,
        ),
        ItemCmd::Restore { item, json } => print_item(
            &c.request(
                Method::POST,
                &format!("/items/{}/restore", enc(&item)),
                None,
            )
            .await?,
            json,
        ),
        ItemCmd::History { item, json } => {
            let h = c.get(&format!("/items/{}/history", enc(&item))).await?;
            if json {
                print_json(&h);
            } else {
                for e in h.as_array().into_iter().flatten() {
                    let mut what: Vec<String> = e["fields"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={}", show(v)))
                        .collect();
                    match e["deleted"].as_bool() {
                        Some(true) => what.push("(deleted)".into()),
                        Some(false) => what.push("(restored)".into()),
                        None => {}
                    }
                    println!("{}  {}", e["hlc"].as_str().unwrap_or(""), what.join("  "));
                }
            }
        }
    }
    Ok(())
}

async fn conflicts_command(c: &Client, a: ConflictsArgs) -> Result<()> {
    if a.item.as_deref() == Some("ack") {
        let done = match (&a.target, &a.tracker) {
            (Some(item), _) => {
                let body = match &a.field {
                    Some(f) => json!({"field": f}),
                    None => json!({}),
                };
                c.request(
                    Method::POST,
                    &format!("/items/{}/conflicts/ack", enc(item)),
                    Some(body),
                )
                .await?
            }
            (None, Some(t)) => {
                c.request(
                    Method::POST,
                    &format!("/trackers/{}/conflicts/ack", enc(t)),
                    None,
                )
                .await?
            }
            (None, None) => bail!("`conflicts ack` needs an ITEM or --tracker TRACKER"),
        };
        if a.json {
            print_json(&done);
        } else {
            println!("acknowledged {} conflicts", done["acknowledged"]);
        }
        return Ok(());
    }
    if let Some(r) = a.restore {
        let item = a.item.context("--restore needs the ITEM")?;
        let updated = c
            .request(
                Method::POST,
                &format!("/items/{}/conflicts/restore", enc(&item)),
                Some(json!({"field": r[0], "hlc": r[1]})),
            )
            .await?;
        print_item(&updated, a.json);
        return Ok(());
    }
    let list = match (&a.item, &a.tracker) {
        (Some(item), _) => c.get(&format!("/items/{}/conflicts", enc(item))).await?,
        (None, Some(t)) => {
            c.get(&format!(
                "/trackers/{}/conflicts{}",
                enc(t),
                if a.all { "?all=true" } else { "" }
            ))
            .await?
        }
        (None, None) => bail!("name an ITEM or pass --tracker TRACKER"),
    };
    if a.json {
        print_json(&list);
        return Ok(());
    }
    let entries = list.as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        println!("no conflicts");
    }
    for e in entries {
        let item = e["item"]
            .as_str()
            .map(|i| format!("{i} "))
            .unwrap_or_default();
        let w = &e["winner"];
        println!(
            "{item}{}: {} (wins, {} by {})",
            e["field"].as_str().unwrap_or(""),
            show(&w["value"]),
            w["hlc"].as_str().unwrap_or(""),
            w["node"].as_str().unwrap_or("")
        );
        for l in e["losers"].as_array().into_iter().flatten() {
            println!(
                "    lost: {}  hlc {}  by {}",
                show(&l["value"]),
                l["hlc"].as_str().unwrap_or(""),
                l["node"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

async fn peer_command(c: &Client, cmd: PeerCmd) -> Result<()> {
    match cmd {
        PeerCmd::Add {
            peer,
            settings,
            read_only,
            json,
        } => {
            let mut body = if peer.starts_with('/') {
                json!({"addr": peer})
            } else {
                json!({"peer_id": peer})
            };
            settings.apply_to(&mut body);
            body["read_only"] = json!(read_only);
            let p = c.request(Method::POST, "/peers", Some(body)).await?;
            if json {
                print_json(&p);
            } else {
                println!("authorized {}", p["peer_id"].as_str().unwrap_or(""));
            }
        }
        PeerCmd::List(f) => {
            let list = c.get("/peers").await?;
            if f.json {
                print_json(&list);
            } else {
                for p in list.as_array().into_iter().flatten() {
                    println!(
                        "{}  {}  mode {}  schedule {}{}  {}",
                        p["peer_id"].as_str().unwrap_or(""),
                        if p["connected"].as_bool() == Some(true) {
                            "connected"
                        } else {
                            "not connected"
                        },
                        p["mode"].as_str().unwrap_or(""),
                        p["schedule"].as_str().unwrap_or(""),
                        if p["read_only"].as_bool() == Some(true) {
                            " read-only"
                        } else {
                            ""
                        },
                        p["name"].as_str().unwrap_or("")
                    );
                }
            }
        }
        PeerCmd::Update {
            peer,
            settings,
            read_only,
            json,
        } => {
            let mut body = json!({});
            settings.apply_to(&mut body);
            if let Some(r) = read_only {
                body["read_only"] = json!(r);
            }
            let p = c
                .request(Method::PATCH, &format!("/peers/{}", enc(&peer)), Some(body))
                .await?;
            if json {
                print_json(&p);
            } else {
                println!("updated {}", p["peer_id"].as_str().unwrap_or(""));
            }
        }
        PeerCmd::Remove { peer } => {
            c.request(Method::DELETE, &format!("/peers/{}", enc(&peer)), None)
                .await?;
            println!("revoked {peer}");
        }
    }
    Ok(())
}

/// Percent-encode a path segment (names and ids are plain, but be safe with user input).
fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn print_json(v: &Json) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn show(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => "(empty)".into(),
        other => other.to_string(),
    }
}

fn print_tracker(t: &Json, json: bool) {
    if json {
        return print_json(t);
    }
    println!(
        "{}  ({}, conflict policy {})",
        t["name"].as_str().unwrap_or(""),
        t["id"].as_str().unwrap_or(""),
        t["conflict_policy"].as_str().unwrap_or("")
    );
    for f in t["fields"].as_array().into_iter().flatten() {
        let opts: Vec<&str> = f["options"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Json::as_str)
            .collect();
        println!(
            "  {:<16} {:<12}{}{}",
            f["name"].as_str().unwrap_or(""),
            f["type"].as_str().unwrap_or(""),
            if f["required"].as_bool() == Some(true) {
                " required"
            } else {
                ""
            },
            if opts.is_empty() {
                String::new()
            } else {
                format!(" [{}]", opts.join(", "))
            }
        );
    }
}

fn item_line(i: &Json) -> String {
    let fields: Vec<String> = i["fields"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", show(v)))
        .collect();
    format!(
        "{:<16} {}{}",
        i["display_id"].as_str().unwrap_or(""),
        fields.join("  "),
        if i["deleted"].as_bool() == Some(true) {
            "  (deleted)"
        } else {
            ""
        }
    )
}

fn print_item(i: &Json, json: bool) {
    if json {
        return print_json(i);
    }
    println!(
        "{}  {}{}",
        i["display_id"].as_str().unwrap_or(""),
        i["id"].as_str().unwrap_or(""),
        if i["deleted"].as_bool() == Some(true) {
            "  (deleted)"
        } else {
            ""
        }
    );
    for (k, v) in i["fields"].as_object().into_iter().flatten() {
        println!("  {k:<16} {}", show(v));
    }
    println!(
        "  created {}  updated {}",
        i["created"].as_str().unwrap_or(""),
        i["updated"].as_str().unwrap_or("")
    );
}

async fn log_command(c: &Client, a: LogArgs) -> Result<()> {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("limit", &a.limit.to_string());
    if let Some(p) = &a.peer {
        query.append_pair("peer", p);
    }
    if let Some(t) = &a.since {
        query.append_pair("since", t);
    }
    let list = c.get(&format!("/log?{}", query.finish())).await?;
    if a.json {
        print_json(&list);
        return Ok(());
    }
    let entries = list.as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        println!("no sync sessions logged");
    }
    for e in entries {
        let peer = e["peer_name"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| e["peer"].as_str().unwrap_or("").to_string());
        println!(
            "{}  {}  {} {}  sent {}  received {}  conflicts {}  {}{}  {} ms  {}",
            e["time"].as_str().unwrap_or(""),
            peer,
            e["trigger"].as_str().unwrap_or(""),
            e["direction"].as_str().unwrap_or(""),
            e["sent"],
            e["received"],
            e["conflicts"],
            e["result"].as_str().unwrap_or(""),
            if e["remote_error"] == true {
                " (remote)"
            } else {
                ""
            },
            e["duration_ms"],
            e["message"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// A spinner with the elapsed time and the items received so far (from the peers' status)
/// while `request` (a one-shot sync) runs, when someone is watching.
async fn with_sync_spinner(
    c: &Client,
    label: &str,
    request: impl std::future::Future<Output = Result<Json>>,
) -> Result<Json> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return request.await;
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {label}… {{elapsed}} {{msg}}"
        ))
        .expect("valid template"),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    tokio::pin!(request);
    let result = loop {
        tokio::select! {
            r = &mut request => break r,
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {
                if let Ok(peers) = c.get("/peers").await {
                    let n: u64 = peers
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p["receiving"].as_u64())
                        .sum();
                    pb.set_message(format!("{n} items received"));
                }
            }
        }
    };
    pb.finish_and_clear();
    result
}

async fn sync_command(c: &Client, a: SyncArgs) -> Result<()> {
    let mut body = json!({});
    if let Some(p) = &a.peer {
        body["peer"] = json!(p);
    }
    if let Some(t) = &a.tracker {
        body["tracker"] = json!(t);
    }
    let request = c.request(Method::POST, "/sync", Some(body));
    let result = with_sync_spinner(c, "syncing", request).await;
    let summary = result?;
    if a.json {
        print_json(&summary);
    } else {
        println!(
            "sent {}  received {}  conflicts {}  errors {}  ({} ms)",
            summary["sent"],
            summary["received"],
            summary["conflicts"],
            summary["errors"],
            summary["duration_ms"]
        );
        for p in summary["peers"].as_array().into_iter().flatten() {
            println!(
                "  {}  sent {}  received {}  conflicts {}  {}",
                p["peer"].as_str().unwrap_or(""),
                p["sent"],
                p["received"],
                p["conflicts"],
                p["error"].as_str().unwrap_or("ok")
            );
        }
    }
    let errors = summary["errors"].as_u64().unwrap_or(0);
    if errors > 0 {
        anyhow::bail!("sync failed with {errors} peer(s)");
    }
    Ok(())
}

/// A progress bar fed from the node's `status` while `request` runs (bundle jobs report
/// `{"op", "done", "total"}` there); nothing when no one watches. `unit` is the indicatif
/// template after the bar, e.g. `{pos}/{len} documents`.
async fn with_progress<T>(
    c: &Client,
    label: &str,
    unit: &str,
    request: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return request.await;
    }
    // A spinner until the node reports how much there is to do (it reads the bundle or the
    // feed first), then a bar.
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!("{{spinner}} {label}… {{elapsed}}"))
            .expect("valid template"),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    let bar = indicatif::ProgressStyle::with_template(&format!(
        "{{spinner}} {label} [{{bar:30}}] {unit} {{elapsed}}"
    ))
    .expect("valid template")
    .progress_chars("=> ");
    let mut sized = false;
    tokio::pin!(request);
    let result = loop {
        tokio::select! {
            r = &mut request => break r,
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                if let Ok(s) = c.get("/status").await {
                    if let (Some(done), Some(total)) =
                        (s["bundle"]["done"].as_u64(), s["bundle"]["total"].as_u64())
                    {
                        if total > 0 {
                            if !sized {
                                pb.set_style(bar.clone());
                                sized = true;
                            }
                            pb.set_length(total);
                            pb.set_position(done);
                        }
                    }
                }
            }
        }
    };
    pb.finish_and_clear();
    result
}

/// Write `bytes` to `path` atomically: a temporary file beside it, synced, then renamed.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

async fn export_command(c: &Client, a: ExportArgs) -> Result<()> {
    let mut body = json!({});
    if !a.trackers.is_empty() {
        body["trackers"] = json!(a.trackers);
    }
    if let Some(s) = a.since {
        body["since"] = json!(s);
    }
    if let Some(p) = &a.for_peer {
        body["for_peer"] = json!(p);
    }
    let bytes = with_progress(
        c,
        "exporting",
        // The node counts feed positions, which have gaps after an unclean stop: a share.
        "{percent}% of the feed",
        c.request_bytes(Method::POST, "/export", Some(body)),
    )
    .await?;
    let header = crate::bundle::read_header(&bytes)
        .context("the node sent a bundle that does not verify")?;
    write_atomically(&a.file, &bytes)?;
    if a.json {
        let mut v = serde_json::to_value(&header).expect("header serializes");
        v["file"] = json!(a.file);
        v["bytes"] = json!(bytes.len());
        print_json(&v);
    } else {
        println!(
            "wrote {}: {} items, {} trackers ({}), {} bytes",
            a.file.display(),
            header.item_docs,
            header.tracker_docs,
            if header.trackers.is_empty() {
                "-".to_string()
            } else {
                header.trackers.join(", ")
            },
            bytes.len()
        );
        println!(
            "changes ({}, {}]; next: trackersync export FILE --since {}",
            header.since, header.last_seq, header.last_seq
        );
    }
    Ok(())
}

async fn import_command(c: &Client, a: ImportArgs) -> Result<()> {
    let bytes = std::fs::read(&a.file)
        .with_context(|| format!("cannot read the bundle {}", a.file.display()))?;
    // Check it here first: a damaged file is refused without a round trip of its bytes.
    crate::bundle::read_header(&bytes).with_context(|| format!("{} refused", a.file.display()))?;
    let summary = with_progress(
        c,
        "importing",
        "{pos}/{len} documents",
        c.post_bytes("/import", bytes),
    )
    .await
    .with_context(|| format!("{} refused", a.file.display()))?;
    if a.json {
        print_json(&summary);
    } else {
        println!(
            "imported {} items, {} trackers from {}: {} merged ({} with conflicts), {} unchanged ({} ms)",
            summary["items"],
            summary["trackers"],
            summary["peer_id"].as_str().unwrap_or(""),
            summary["merged"],
            summary["conflicts"],
            summary["unchanged"],
            summary["duration_ms"]
        );
        for (key, what) in [
            (
                "incomplete",
                "lack earlier changes (import the earlier bundle first, or sync)",
            ),
            (
                "deferred",
                "are stamped too far ahead of this node's clock (import again later)",
            ),
            (
                "not_allowed",
                "were not taken (the peer's allowed operations or share policy)",
            ),
            ("refused", "failed validation"),
        ] {
            let n = summary[key].as_u64().unwrap_or(0);
            if n > 0 {
                println!("  {n} documents {what}");
            }
        }
    }
    let bad =
        summary["refused"].as_u64().unwrap_or(0) + summary["incomplete"].as_u64().unwrap_or(0);
    if bad > 0 {
        bail!("{bad} documents of the bundle were not applied");
    }
    Ok(())
}

async fn clone_command(c: &Client, a: CloneArgs) -> Result<()> {
    let peers = c.get("/peers").await?;
    let from_addr = a.peer.parse::<Multiaddr>().ok().and_then(|m| {
        m.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id.to_string()),
            _ => None,
        })
    });
    let known = peers.as_array().into_iter().flatten().find(|p| {
        let id = p["peer_id"].as_str();
        id == Some(a.peer.as_str())
            || p["name"].as_str() == Some(a.peer.as_str())
            || (from_addr.is_some() && id == from_addr.as_deref())
    });
    let peer_id = match known {
        Some(p) => {
            let id = p["peer_id"].as_str().unwrap_or_default().to_string();
            // A share policy that leaves the tracker out would drop it: add it.
            if let Some(list) = p["trackers"].as_array() {
                if !list.iter().any(|t| t.as_str() == Some(a.tracker.as_str())) {
                    let mut list = list.clone();
                    list.push(json!(a.tracker));
                    c.request(
                        Method::PATCH,
                        &format!("/peers/{}", enc(&id)),
                        Some(json!({"trackers": list})),
                    )
                    .await?;
                }
            }
            id
        }
        None if from_addr.is_some() => {
            let p = c
                .request(
                    Method::POST,
                    "/peers",
                    Some(json!({"addr": a.peer, "trackers": [a.tracker]})),
                )
                .await?;
            p["peer_id"].as_str().unwrap_or_default().to_string()
        }
        None => bail!(
            "no peer {:?}: give its address (a multiaddr ending in /p2p/<PeerId>) or add it with `trackersync peer add`",
            a.peer
        ),
    };
    let request = c.request(Method::POST, "/sync", Some(json!({"peer": peer_id})));
    let summary = with_sync_spinner(c, "cloning", request).await?;
    if summary["errors"].as_u64().unwrap_or(0) > 0 {
        let why = summary["peers"][0]["error"]
            .as_str()
            .unwrap_or("sync failed");
        bail!("cloning {:?} from {peer_id} failed: {why}", a.tracker);
    }
    let tracker = c
        .get(&format!("/trackers/{}", enc(&a.tracker)))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "peer {peer_id} sent no tracker {:?}: it has none by that name, or does not share it with this node",
                a.tracker
            )
        })?;
    let page = c
        .get(&format!("/trackers/{}/items?limit=1", enc(&a.tracker)))
        .await?;
    if a.json {
        print_json(&json!({
            "peer": peer_id,
            "tracker": tracker,
            "received": summary["received"],
            "duration_ms": summary["duration_ms"],
        }));
    } else {
        println!(
            "cloned tracker {} from {peer_id}: {} documents received ({} ms){}",
            tracker["name"].as_str().unwrap_or(&a.tracker),
            summary["received"],
            summary["duration_ms"],
            if page["items"].as_array().is_some_and(|i| i.is_empty()) {
                "; it has no items"
            } else {
                ""
            }
        );
        println!("it stays synced with the peer per its settings (`trackersync peer list`)");
    }
    Ok(())
}
