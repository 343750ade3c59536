//! One resolved configuration, and the data directory's identity files. Defaults live here only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libp2p::identity::Keypair;
use libp2p::Multiaddr;

use crate::hlc::{NodeId, DEFAULT_MAX_DRIFT_MS};

/// Default local API address. `--api 127.0.0.1:0` picks a free port.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:7420";
/// Default libp2p listen address: every interface (mDNS ignores loopback), any port.
pub const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/tcp/0";
/// Largest request body the local API accepts.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest bundle `POST /api/v1/import` accepts (a 100k-item tracker is about 60 MB).
pub const MAX_BUNDLE_BYTES: usize = 2 * 1024 * 1024 * 1024 - 1;

pub const FILE_NODE_ID: &str = "node-id";
pub const FILE_IDENTITY: &str = "identity.key";
pub const FILE_API_TOKEN: &str = "api-token";
pub const FILE_API_ADDR: &str = "api-addr";
pub const DIR_DB: &str = "db";
/// Space set aside in the data directory: sled cannot even open a store on a full disk, so
/// a node that finds its disk full at start-up releases this file to open.
pub const FILE_RESERVE: &str = "reserve";
pub const RESERVE_BYTES: usize = 2 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub api_addr: SocketAddr,
    pub listen: Vec<Multiaddr>,
    pub mdns: bool,
    /// Remote stamps further ahead than this wait (SPEC section 2).
    pub max_drift_ms: u64,
    /// Shift of this node's wall clock, for skew tests of real processes.
    pub clock_offset_ms: i64,
    /// Write `api-addr` once listening (off for the CLI's embedded node).
    pub publish_api_addr: bool,
    /// Shared secret of a deployment: peers proving it are authorized on first contact.
    pub join_key: Option<String>,
    /// Memory for caches (decoded documents and the store's page cache), in bytes.
    pub cache_bytes: u64,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            api_addr: DEFAULT_API_ADDR.parse().expect("valid default address"),
            listen: vec![DEFAULT_LISTEN.parse().expect("valid default multiaddr")],
            mdns: true,
            max_drift_ms: DEFAULT_MAX_DRIFT_MS,
            clock_offset_ms: 0,
            publish_api_addr: true,
            join_key: None,
            cache_bytes: crate::repo::DEFAULT_CACHE_BYTES,
        }
    }
}

/// The platform data directory (`~/.local/share/trackersync` on Linux).
pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("org", "trackersync", "trackersync")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".trackersync"))
}

/// What a node is: created on first run, then read back.
pub struct Identity {
    pub node: NodeId,
    pub keypair: Keypair,
    pub api_token: String,
}

impl Identity {
    /// Read the identity in `dir`, creating the directory and any missing file first.
    pub fn init(dir: &Path) -> Result<Identity> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data directory {}", dir.display()))?;
        let node = read_or_create(&dir.join(FILE_NODE_ID), || {
            NodeId::random().to_string().into_bytes()
        })?;
        let node: NodeId = std::str::from_utf8(&node)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| {
                format!(
                    "{} does not hold a node UUID",
                    dir.join(FILE_NODE_ID).display()
                )
            })?;
        let key = read_or_create(&dir.join(FILE_IDENTITY), || {
            Keypair::generate_ed25519()
                .to_protobuf_encoding()
                .expect("ed25519 keys encode")
        })?;
        let keypair = Keypair::from_protobuf_encoding(&key).with_context(|| {
            format!(
                "{} does not hold a libp2p key",
                dir.join(FILE_IDENTITY).display()
            )
        })?;
        let token = read_or_create(&dir.join(FILE_API_TOKEN), || {
            hex::encode(rand::random::<[u8; 32]>()).into_bytes()
        })?;
        let api_token = String::from_utf8(token)
            .context("api-token is not text")?
            .trim()
            .to_string();
        Ok(Identity {
            node,
            keypair,
            api_token,
        })
    }
}

/// Read `path`, or create it (mode 0600, written then renamed so a crash never leaves half a
/// file) with `make()`.
fn read_or_create(path: &Path, make: impl FnOnce() -> Vec<u8>) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => return Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    write_private(path, &make())?;
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Write a file readable only by its owner, atomically.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Bytes an unprivileged writer may still use on the file system holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct from a NUL-terminated path; nothing else.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}
