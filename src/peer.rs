//! A peer as an administrator configures it (SPEC section 3): who, where, and how to sync.
//! Persisted as JSON in the store; the network loop holds the live copy.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub peer_id: String,
    /// Known multiaddrs (given, or learned from identify and mDNS).
    #[serde(default)]
    pub addrs: Vec<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// `pull`, `push` or `both`.
    #[serde(default = "both")]
    pub mode: String,
    /// `continuous`, `manual` or an interval such as `15m`.
    #[serde(default = "continuous")]
    pub schedule: String,
    /// Pushes from this peer are refused (we do not take its changes).
    #[serde(default)]
    pub read_only: bool,
    /// Trackers shared with this peer; `None` means all.
    #[serde(default)]
    pub trackers: Option<Vec<String>>,
}

fn both() -> String {
    "both".into()
}

fn continuous() -> String {
    "continuous".into()
}

impl PeerConfig {
    pub fn new(peer_id: String) -> Self {
        PeerConfig {
            peer_id,
            addrs: Vec::new(),
            name: None,
            mode: both(),
            schedule: continuous(),
            read_only: false,
            trackers: None,
        }
    }

    /// Whether we take this peer's changes.
    pub fn pulls(&self) -> bool {
        !self.read_only && (self.mode == "both" || self.mode == "pull")
    }

    /// Whether we serve this peer our changes.
    pub fn pushes(&self) -> bool {
        self.mode == "both" || self.mode == "push"
    }

    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.mode.as_str(), "both" | "pull" | "push") {
            return Err(format!("mode {:?}: use both, pull or push", self.mode));
        }
        if self.schedule != "continuous" {
            return Err(format!(
                "schedule {:?}: only continuous is available in this version",
                self.schedule
            ));
        }
        if self.trackers.is_some() {
            return Err("per-peer tracker sharing is not available in this version".into());
        }
        Ok(())
    }
}
