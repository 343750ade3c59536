//! The sync log (Sahana's): one entry per sync session with a peer, newest first, bounded
//! (the store drops the oldest past [`crate::store::LOG_MAX_ENTRIES`]). Entries never hold
//! secrets: peer ids, names, counts and messages only.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Entry number (increasing); set when read back.
    #[serde(default)]
    pub id: u64,
    /// When the session started (RFC 3339).
    pub time: String,
    pub peer: String,
    #[serde(default)]
    pub peer_name: Option<String>,
    /// The tracker the session was limited to, if any.
    #[serde(default)]
    pub tracker: Option<String>,
    /// The peer's configured mode (`both`, `pull`, `push`).
    pub mode: String,
    /// `received` (we pulled the peer's changes), `sent` (the peer pulled ours) or `both`
    /// (a one-shot sync).
    pub direction: String,
    /// What started it: `continuous` (live sync), `scheduled`, `manual` (one-shot sync),
    /// `reconcile` (first contact), `peer` (the peer pulled our changes) or `bundle` (a
    /// bundle file imported from the peer, or exported for it).
    pub trigger: String,
    pub sent: u64,
    pub received: u64,
    /// Items whose merge left concurrent values on a field (listed under `conflicts`).
    pub conflicts: u64,
    /// Changes of the peer not applied: it may not make them (its allowed operations).
    #[serde(default)]
    pub refused: u64,
    /// `ok`, `error`, or `refused` (a read-only peer's changes were not taken).
    pub result: String,
    /// Whether the error came from the peer (it refused or misbehaved) rather than from us.
    pub remote_error: bool,
    pub message: String,
    pub duration_ms: u64,
}

impl LogEntry {
    /// An entry for a session with `peer` started at `time`: no items, result `ok`.
    pub fn new(
        time: chrono::DateTime<chrono::Utc>,
        peer: String,
        config: &crate::peer::PeerConfig,
        direction: &str,
        trigger: &str,
    ) -> LogEntry {
        LogEntry {
            id: 0,
            time: time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            peer,
            peer_name: config.name.clone(),
            tracker: None,
            mode: config.mode.clone(),
            direction: direction.into(),
            trigger: trigger.into(),
            sent: 0,
            received: 0,
            conflicts: 0,
            refused: 0,
            result: "ok".into(),
            remote_error: false,
            message: String::new(),
            duration_ms: 0,
        }
    }
}
