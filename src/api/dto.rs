//! JSON shapes of the local API (SPEC section 4, "Local API v1, pinned"). Requests refuse
//! unknown fields; conversion into domain types validates.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use crate::item::{FieldConflict, HistoryEntry, ItemView};
use crate::model::{ConflictPolicy, FieldDef, FieldType};
use crate::register::Cell;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldIn {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub options: Vec<String>,
}

impl From<FieldIn> for FieldDef {
    fn from(f: FieldIn) -> FieldDef {
        FieldDef {
            label: f.label.unwrap_or_else(|| f.name.clone()),
            name: f.name,
            ty: f.ty,
            required: f.required,
            options: f.options,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTracker {
    pub name: String,
    #[serde(default)]
    pub fields: Vec<FieldIn>,
    #[serde(default)]
    pub conflict_policy: Option<ConflictPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTracker {
    pub conflict_policy: ConflictPolicy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemFields {
    pub fields: Map<String, Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConflict {
    pub field: String,
    pub hlc: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub limit: Option<usize>,
    pub after: Option<Uuid>,
    /// `true`: deleted items too; `only`: deleted items only; default: live items only.
    pub deleted: Option<String>,
}

#[derive(Serialize)]
pub struct ItemOut {
    pub id: Uuid,
    pub display_id: String,
    pub tracker: Uuid,
    pub fields: BTreeMap<String, Json>,
    pub deleted: bool,
    pub created: String,
    pub updated: String,
    pub origin: String,
}

impl From<ItemView> for ItemOut {
    fn from(v: ItemView) -> Self {
        ItemOut {
            id: v.id,
            display_id: v.display_id,
            tracker: v.tracker,
            fields: v.fields,
            deleted: v.deleted,
            created: v.created.to_string(),
            updated: v.updated.to_string(),
            origin: v.origin.to_string(),
        }
    }
}

#[derive(Serialize)]
pub struct ItemPage {
    pub items: Vec<ItemOut>,
    pub next: Option<Uuid>,
}

#[derive(Serialize)]
pub struct CellOut {
    pub value: Json,
    pub hlc: String,
    pub node: String,
}

impl From<Cell> for CellOut {
    fn from(c: Cell) -> Self {
        CellOut {
            value: c.value.unwrap_or(Json::Null),
            hlc: c.hlc.to_string(),
            node: c.hlc.node.to_string(),
        }
    }
}

#[derive(Serialize)]
pub struct ConflictOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<Uuid>,
    pub field: String,
    pub winner: CellOut,
    pub losers: Vec<CellOut>,
}

impl ConflictOut {
    pub fn new(item: Option<Uuid>, c: FieldConflict) -> Self {
        ConflictOut {
            item,
            field: c.field,
            winner: c.winner.into(),
            losers: c.losers.into_iter().map(Into::into).collect(),
        }
    }
}

#[derive(Serialize)]
pub struct HistoryOut {
    pub hlc: String,
    pub node: String,
    pub fields: BTreeMap<String, Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
}

impl From<HistoryEntry> for HistoryOut {
    fn from(h: HistoryEntry) -> Self {
        HistoryOut {
            hlc: h.hlc.to_string(),
            node: h.hlc.node.to_string(),
            fields: h
                .fields
                .into_iter()
                .map(|(k, v)| (k, v.unwrap_or(Json::Null)))
                .collect(),
            deleted: h.deleted,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerIn {
    pub addr: Option<String>,
    pub peer_id: Option<String>,
    pub addrs: Option<Vec<String>>,
    pub name: Option<String>,
    pub mode: Option<String>,
    pub schedule: Option<String>,
    pub read_only: Option<bool>,
    /// Absent: unchanged (all, on creation); `null`: every tracker; a list: only those.
    #[serde(default, deserialize_with = "present")]
    pub trackers: Option<Option<Vec<String>>>,
    /// Absent: unchanged (all, on creation); `null`: all; a list of create/update/delete.
    #[serde(default, deserialize_with = "present")]
    pub allow: Option<Option<Vec<String>>>,
}

/// A field that may be absent (`None`), `null` (`Some(None)`) or a value.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Serialize)]
pub struct Status {
    pub node_id: String,
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub trackers: u64,
    pub items: u64,
    pub peers: Vec<crate::net::PeerStatus>,
    pub clock: String,
    pub version: &'static str,
    /// An export or import under way: `{"op", "done", "total"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<BundleProgress>,
}

#[derive(Serialize)]
pub struct BundleProgress {
    pub op: &'static str,
    pub done: u64,
    pub total: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExportIn {
    /// Only these trackers (names or ids).
    #[serde(default)]
    pub trackers: Vec<String>,
    pub since: Option<u64>,
    pub for_peer: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Only this peer's sessions (its PeerId).
    pub peer: Option<String>,
    /// Only sessions started at or after this time (RFC 3339).
    pub since: Option<String>,
    /// At most this many entries (default 100, at most 10,000).
    pub limit: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SyncIn {
    /// One peer (its PeerId); default: every peer.
    pub peer: Option<String>,
    pub tracker: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AckConflicts {
    /// Only this field's conflict; default: every field of the item.
    pub field: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxQuery {
    /// `true`: reviewed conflicts too.
    pub all: Option<bool>,
}
