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
    /// What this peer's changes may do to our items: any of `create`, `update`, `delete`
    /// (Sahana's strategies); `None` means all three.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
}

/// The operations a peer's changes may perform on our items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ops {
    pub create: bool,
    pub update: bool,
    pub delete: bool,
}

impl Ops {
    pub const ALL: Ops = Ops {
        create: true,
        update: true,
        delete: true,
    };
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
            allow: None,
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

    /// The interval of an interval schedule (`30s`, `15m`, `2h`); `None` for
    /// `continuous`/`manual`.
    pub fn interval(&self) -> Option<std::time::Duration> {
        let (n, unit) = self.schedule.split_at(self.schedule.len().checked_sub(1)?);
        let n: u64 = n.parse().ok().filter(|n| *n >= 1)?;
        match unit {
            "s" => Some(std::time::Duration::from_secs(n)),
            "m" => Some(std::time::Duration::from_secs(n.checked_mul(60)?)),
            "h" => Some(std::time::Duration::from_secs(n.checked_mul(3600)?)),
            _ => None,
        }
    }

    /// The operations this peer's changes may perform.
    pub fn ops(&self) -> Ops {
        match &self.allow {
            None => Ops::ALL,
            Some(list) => Ops {
                create: list.iter().any(|o| o == "create"),
                update: list.iter().any(|o| o == "update"),
                delete: list.iter().any(|o| o == "delete"),
            },
        }
    }

    /// The trackers shared with this peer, its share policy's names or ids resolved against
    /// `known`; `None` when it shares every tracker.
    pub fn shared(
        &self,
        known: &[crate::model::Tracker],
    ) -> Option<std::collections::HashSet<uuid::Uuid>> {
        let names = self.trackers.as_ref()?;
        Some(
            known
                .iter()
                .filter(|t| names.iter().any(|n| *n == t.name || *n == t.id.to_string()))
                .map(|t| t.id)
                .collect(),
        )
    }

    /// The store incarnation we present to this peer: with a share policy, it changes
    /// whenever the policy does, so the peer's checkpoint lapses and it pulls again from the
    /// start (back-filling a tracker that became shared).
    pub fn served_incarnation(&self, ours: uuid::Uuid) -> uuid::Uuid {
        match &self.trackers {
            None => ours,
            Some(list) => {
                let mut list = list.clone();
                list.sort();
                let mut h = blake3::Hasher::new();
                h.update(ours.as_bytes());
                for t in &list {
                    h.update(&(t.len() as u64).to_be_bytes());
                    h.update(t.as_bytes());
                }
                uuid::Uuid::from_bytes(h.finalize().as_bytes()[..16].try_into().expect("16 bytes"))
            }
        }
    }

    /// Whether changes move as they happen (otherwise only on schedule or on request).
    pub fn continuous(&self) -> bool {
        self.schedule == "continuous"
    }

    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.mode.as_str(), "both" | "pull" | "push") {
            return Err(format!("mode {:?}: use both, pull or push", self.mode));
        }
        if !matches!(self.schedule.as_str(), "continuous" | "manual") && self.interval().is_none() {
            return Err(format!(
                "schedule {:?}: use continuous, manual or an interval such as 30s, 15m or 2h",
                self.schedule
            ));
        }
        if let Some(bad) = self
            .allow
            .iter()
            .flatten()
            .find(|o| !matches!(o.as_str(), "create" | "update" | "delete"))
        {
            return Err(format!(
                "operation {bad:?}: allow create, update and/or delete"
            ));
        }
        if let Some(list) = &self.trackers {
            if list.len() > 1000 {
                return Err("a share policy names at most 1000 trackers".into());
            }
            if let Some(bad) = list.iter().find(|t| t.is_empty() || t.len() > 200) {
                return Err(format!(
                    "tracker {bad:?} in the share policy: use a tracker's name or id"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_or_are_refused() {
        let with = |s: &str| PeerConfig {
            schedule: s.into(),
            ..PeerConfig::new("p".into())
        };
        assert_eq!(
            with("15m").interval(),
            Some(std::time::Duration::from_secs(900))
        );
        assert_eq!(
            with("2h").interval(),
            Some(std::time::Duration::from_secs(7200))
        );
        assert_eq!(
            with("30s").interval(),
            Some(std::time::Duration::from_secs(30))
        );
        for ok in ["continuous", "manual", "1m", "24h", "30s"] {
            assert!(with(ok).validate().is_ok(), "{ok}");
        }
        for bad in ["", "0m", "0s", "15", "m", "15d", "-3m", "1.5h", "hourly"] {
            assert!(with(bad).validate().is_err(), "{bad}");
        }
    }
}
