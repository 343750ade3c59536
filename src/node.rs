//! The composition root: opens the repo, starts the network and the local API, and shuts
//! them down in order: API, network, then a final store flush.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use libp2p::PeerId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api;
use crate::config::{Config, Identity, DIR_DB, FILE_API_ADDR, FILE_RESERVE, RESERVE_BYTES};
use crate::hlc::{Clock, NodeId, SystemClock};
use crate::net::{Net, NetHandle};
use crate::repo::Repo;

/// Facts about the running node that the API reports.
#[derive(Clone)]
pub struct NodeInfo {
    pub node: NodeId,
    pub peer_id: PeerId,
    /// The network, when this node syncs (the CLI's embedded node does not).
    pub net: Option<NetHandle>,
}

pub struct Node {
    repo: Arc<Repo>,
    info: NodeInfo,
    api_addr: SocketAddr,
    api_task: JoinHandle<()>,
    net: Option<Net>,
    shutdown: watch::Sender<bool>,
    config: Config,
}

impl Node {
    /// Start with the system clock (shifted by `clock_offset_ms`).
    pub async fn start(config: Config) -> Result<Node> {
        let clock = Arc::new(SystemClock {
            offset_ms: config.clock_offset_ms,
        });
        Node::start_with_clock(config, clock).await
    }

    pub async fn start_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Node> {
        let identity = Identity::init(&config.data_dir)?;
        let db = config.data_dir.join(DIR_DB);
        let (node, drift, cache) = (identity.node, config.max_drift_ms, config.cache_bytes);
        let reserve = config.data_dir.join(FILE_RESERVE);
        let repo = tokio::task::spawn_blocking(move || {
            match Repo::open_with_cache(&db, node, clock.clone(), drift, cache) {
                Err(e) if is_disk_full(&e) && reserve.exists() => {
                    // sled cannot open on a full disk: give it the space set aside.
                    tracing::warn!(
                        "the disk is full: releasing the {} MiB reserve to open the store; free some space",
                        RESERVE_BYTES >> 20
                    );
                    let _ = std::fs::remove_file(&reserve);
                    Repo::open_with_cache(&db, node, clock, drift, cache)
                }
                r => r,
            }
        })
        .await
        .context("store open task failed")?
        .map_err(|e| match e {
                crate::repo::RepoError::Store(crate::store::StoreError::Sled(sled::Error::Io(
                    io,
                ))) if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("lock") =>
                {
                    anyhow::anyhow!(
                        "data directory {} is in use by another trackersync process",
                        config.data_dir.display()
                    )
                }
                e => anyhow::Error::new(e).context("cannot open the store"),
            })?;
        let repo = Arc::new(repo);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let peer_id = identity.keypair.public().to_peer_id();
        let net = if config.listen.is_empty() {
            None
        } else {
            Some(
                Net::start(
                    identity.keypair.clone(),
                    &config.listen,
                    config.mdns,
                    config.join_key.as_deref(),
                    repo.clone(),
                    shutdown_rx.clone(),
                )
                .await?,
            )
        };
        let info = NodeInfo {
            node,
            peer_id,
            net: net.as_ref().map(|n| n.handle.clone()),
        };
        let listener = tokio::net::TcpListener::bind(config.api_addr)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (use --api 127.0.0.1:0 for any free port)",
                    config.api_addr
                )
            })?;
        let api_addr = listener.local_addr()?;
        let state = api::AppState::new(
            repo.clone(),
            info.clone(),
            identity.api_token,
            shutdown_rx.clone(),
        );
        let app = api::router(state);
        let mut rx = shutdown_rx;
        let api_task = tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "local API server failed");
            }
        });
        // Before the node counts as started (only when the disk has room to spare: on a
        // nearly full disk the reserve must not take the room the store and api-addr need).
        let dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || ensure_reserve(&dir))
            .await
            .context("disk reserve task failed")?;
        if config.publish_api_addr {
            crate::config::write_private(
                &config.data_dir.join(FILE_API_ADDR),
                api_addr.to_string().as_bytes(),
            )?;
        }
        tracing::info!(node = %node, peer_id = %info.peer_id, api = %api_addr, "node started");
        Ok(Node {
            repo,
            info,
            api_addr,
            api_task,
            net,
            shutdown,
            config,
        })
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    pub fn repo(&self) -> &Arc<Repo> {
        &self.repo
    }

    /// Resolves once the store has failed (a flush hit a full disk or an I/O error; sled
    /// then refuses writes until reopened) and the data directory takes writes again: the
    /// caller restarts the node on the same store.
    pub async fn store_recoverable(&self) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tick.tick().await;
            if !self.repo.store().failed() {
                continue;
            }
            let dir = self.config.data_dir.clone();
            let room = tokio::task::spawn_blocking(move || probe_space(&dir))
                .await
                .unwrap_or(false);
            if room {
                return;
            }
        }
    }

    /// The addresses this node listens on now (to restart it on the same ones).
    pub async fn listening(&self) -> (SocketAddr, Vec<libp2p::Multiaddr>) {
        let p2p = match &self.info.net {
            Some(net) => net
                .listen_addrs()
                .await
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            None => Vec::new(),
        };
        (self.api_addr, p2p)
    }

    /// Stop the API (open event streams end), then flush the store.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.api_task.await {
            tracing::error!(error = %e, "local API task panicked");
        }
        if let Some(net) = self.net {
            net.shutdown().await;
        }
        if self.config.publish_api_addr {
            let _ = std::fs::remove_file(self.config.data_dir.join(FILE_API_ADDR));
        }
        // The node's handles share the store; the last one lets it close with a checkpoint.
        drop(self.info);
        let repo = self.repo;
        tokio::task::spawn_blocking(move || match Arc::try_unwrap(repo) {
            Ok(repo) => repo.close(),
            Err(repo) => {
                // A task still holds the store: flush it; the next start replays the log.
                tracing::debug!("store still shared at shutdown: flushed, not checkpointed");
                repo.store().flush_for_stop().map_err(Into::into)
            }
        })
        .await
        .context("flush task failed")??;
        tracing::info!("node stopped");
        Ok(())
    }
}

fn is_disk_full(e: &crate::repo::RepoError) -> bool {
    matches!(
        e,
        crate::repo::RepoError::Store(crate::store::StoreError::Sled(sled::Error::Io(io)))
            if io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28)
    )
}

/// Set space aside for the next start on a full disk, unless it is already there, or the
/// disk has less than twice its size free: then setting it aside would itself fill the disk
/// under the store's writes, and it is tried again at the next start.
fn ensure_reserve(dir: &std::path::Path) {
    let path = dir.join(FILE_RESERVE);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() as usize == RESERVE_BYTES) {
        return;
    }
    if crate::config::free_bytes(dir).is_some_and(|free| free < 2 * RESERVE_BYTES as u64) {
        tracing::warn!("the disk is nearly full: no reserve set aside; a full disk may keep the node from starting");
        return;
    }
    if let Err(e) = write_zeros(&path, RESERVE_BYTES) {
        let _ = std::fs::remove_file(&path);
        tracing::warn!(error = %e, "cannot set aside the disk reserve; a full disk may keep the node from starting");
    }
}

/// Whether the data directory takes writes again: room for half the reserve.
fn probe_space(dir: &std::path::Path) -> bool {
    let probe = dir.join(".space-probe");
    let ok = write_zeros(&probe, RESERVE_BYTES / 2).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

fn write_zeros(path: &std::path::Path, n: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(&vec![0u8; n])?;
    f.sync_all()
}
