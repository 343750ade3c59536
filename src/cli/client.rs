//! How CLI commands reach a node: through the running node's local API, or, when no node runs
//! on the data directory, through an embedded node started for this one command (sled allows
//! one process per store, so the CLI never opens the store beside a running node).

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::Method;
use serde_json::Value as Json;

use crate::config::{Config, FILE_API_ADDR, FILE_API_TOKEN};
use crate::node::Node;

/// How long to wait for a running node to answer before deciding none runs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Set when this command runs its own node; shut down (flushed) by [`Client::close`].
    embedded: Option<Node>,
}

impl Client {
    pub async fn connect(data_dir: &Path) -> Result<Client> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .context("cannot build HTTP client")?;
        if let Ok(addr) = std::fs::read_to_string(data_dir.join(FILE_API_ADDR)) {
            let token = read_token(data_dir)?;
            let base = format!("http://{}", addr.trim());
            let probe = http
                .get(format!("{base}/api/v1/status"))
                .bearer_auth(&token)
                .timeout(PROBE_TIMEOUT)
                .send()
                .await;
            match probe {
                Ok(r) if r.status().is_success() => {
                    return Ok(Client {
                        http,
                        base,
                        token,
                        embedded: None,
                    })
                }
                // A stale api-addr (node killed) refuses connections; anything else is a node
                // that answers oddly, which we should not paper over.
                Ok(r) => bail!(
                    "the node at {base} answered {}; is api-token current?",
                    r.status()
                ),
                Err(e) if e.is_connect() => {}
                Err(e) => return Err(e).context(format!("cannot reach the node at {base}")),
            }
        }
        if !data_dir.exists() {
            bail!(
                "no trackersync data directory at {}; start a node with `trackersync serve` or create one with `trackersync init`",
                data_dir.display()
            );
        }
        let mut config = Config::new(data_dir.to_path_buf());
        config.api_addr = "127.0.0.1:0".parse().expect("valid address");
        config.publish_api_addr = false;
        config.mdns = false;
        config.listen.clear();
        let node = Node::start(config).await?;
        Ok(Client {
            http,
            base: format!("http://{}", node.api_addr()),
            token: read_token(data_dir)?,
            embedded: Some(node),
        })
    }

    pub async fn request(&self, method: Method, path: &str, body: Option<Json>) -> Result<Json> {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        json_answer(req.send().await.context("the node did not answer")?).await
    }

    /// A request whose answer is raw bytes (a bundle); errors as for [`Client::request`].
    pub async fn request_bytes(
        &self,
        method: Method,
        path: &str,
        body: Option<Json>,
    ) -> Result<Vec<u8>> {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.context("the node did not answer")?;
        let status = res.status();
        let bytes = res
            .bytes()
            .await
            .context("the node's answer was cut short")?;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        let json: Json = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
        Err(api_error(&json, status))
    }

    /// POST raw bytes (a bundle); the answer is JSON.
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> Result<Json> {
        let res = self
            .http
            .post(format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/vnd.trackersync.bundle",
            )
            .body(body)
            .send()
            .await
            .context("the node did not answer")?;
        json_answer(res).await
    }

    pub async fn get(&self, path: &str) -> Result<Json> {
        self.request(Method::GET, path, None).await
    }

    pub async fn close(self) -> Result<()> {
        if let Some(node) = self.embedded {
            node.shutdown().await?;
        }
        Ok(())
    }
}

/// A JSON answer, or the API error it carries.
async fn json_answer(res: reqwest::Response) -> Result<Json> {
    let status = res.status();
    let text = res
        .text()
        .await
        .context("the node's answer was cut short")?;
    let json: Json = serde_json::from_str(&text).unwrap_or(Json::String(text));
    if status.is_success() {
        return Ok(json);
    }
    Err(api_error(&json, status))
}

/// The message of an API error answer (`{"error": {"message"}}`), with its status.
fn api_error(json: &Json, status: reqwest::StatusCode) -> anyhow::Error {
    let message = json["error"]["message"]
        .as_str()
        .unwrap_or("unexpected answer");
    anyhow!("{message} ({status})")
}

fn read_token(data_dir: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(data_dir.join(FILE_API_TOKEN))
        .with_context(|| format!("cannot read the API token in {}", data_dir.display()))?
        .trim()
        .to_string())
}
