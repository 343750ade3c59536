//! The composition root: opens the repo, starts the network and the local API, and shuts
//! them down in order: API, network, then a final store flush.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use libp2p::PeerId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api;
use crate::config::{Config, Identity, DIR_DB, FILE_API_ADDR};
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
        let (node, drift) = (identity.node, config.max_drift_ms);
        let repo = tokio::task::spawn_blocking(move || Repo::open(&db, node, clock, drift))
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
        let repo = self.repo;
        tokio::task::spawn_blocking(move || repo.store().flush())
            .await
            .context("flush task failed")??;
        tracing::info!("node stopped");
        Ok(())
    }
}
