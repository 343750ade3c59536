//! Last-writer-wins registers on top of Automerge maps.
//!
//! Every register (an item field, the deleted flag, a tracker's name or field definition) is one
//! map key holding a byte cell that carries its own HLC:
//!
//! ```text
//! version u8 (=1) | wall_ms u64 BE | logical u32 BE | node uuid 16 B | tag u8 | payload
//! tag 0 = cleared (null, tombstone), tag 1 = value; payload = canonical JSON
//! ```
//!
//! Automerge keeps every concurrent write of a key (`get_all`); a read ranks them by the
//! tracker's conflict policy and takes the best, so every replica holding the same changes picks
//! the same winner, whatever Automerge's own actor-id order says. A causally later write always
//! supersedes the values it saw, and the write rule (stamp above everything visible) makes its
//! stamp larger too, so the winner is always the write with the highest (HLC, node).

use automerge::{ObjId, ReadDoc, ScalarValue, Value, ROOT};
use serde_json::Value as Json;

use crate::hlc::{Hlc, NodeId, HLC_BYTES};
use crate::model::ConflictPolicy;

const CELL_VERSION: u8 = 1;
const TAG_CLEARED: u8 = 0;
const TAG_VALUE: u8 = 1;
const HEADER: usize = 1 + HLC_BYTES + 1;

/// One decoded register value.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub hlc: Hlc,
    /// `None` when the write cleared the register.
    pub value: Option<Json>,
}

pub fn encode(hlc: Hlc, value: Option<&Json>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 16);
    out.push(CELL_VERSION);
    out.extend_from_slice(&hlc.to_bytes());
    match value {
        None => out.push(TAG_CLEARED),
        Some(v) => {
            out.push(TAG_VALUE);
            // Serializing a serde_json::Value into a Vec cannot fail.
            serde_json::to_writer(&mut out, v).expect("json into a vec");
        }
    }
    out
}

pub fn decode(b: &[u8]) -> Option<Cell> {
    if b.len() < HEADER || b[0] != CELL_VERSION {
        return None;
    }
    let hlc = Hlc::from_bytes(&b[1..1 + HLC_BYTES])?;
    let value = match b[HEADER - 1] {
        TAG_CLEARED if b.len() == HEADER => None,
        TAG_VALUE => Some(serde_json::from_slice(&b[HEADER..]).ok()?),
        _ => return None,
    };
    Some(Cell { hlc, value })
}

/// Every concurrent value of `key` in the root map that decodes as a cell. Values that do not
/// (written by a buggy or hostile peer) are ignored, the same way on every replica.
pub fn cells<D: ReadDoc>(doc: &D, key: &str) -> Vec<Cell> {
    cells_in(doc, &ROOT, key)
}

pub fn cells_in<D: ReadDoc>(doc: &D, obj: &ObjId, key: &str) -> Vec<Cell> {
    let Ok(all) = doc.get_all(obj, key) else {
        return Vec::new();
    };
    all.into_iter()
        .filter_map(|(v, _)| match v {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Bytes(b) => decode(b),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Order `cells` best first under `policy`. Ties on the whole stamp cannot happen between honest
/// writers (the node is part of the stamp); the payload breaks them anyway so the order is total.
pub fn rank(cells: &mut [Cell], policy: ConflictPolicy, origin: NodeId) {
    cells.sort_by(|a, b| {
        let key = |c: &Cell| {
            let from_origin = policy == ConflictPolicy::Origin && c.hlc.node == origin;
            (from_origin, c.hlc)
        };
        key(b)
            .cmp(&key(a))
            .then_with(|| payload_bytes(b).cmp(&payload_bytes(a)))
    });
}

fn payload_bytes(c: &Cell) -> Vec<u8> {
    c.value
        .as_ref()
        .map(|v| serde_json::to_vec(v).unwrap_or_default())
        .unwrap_or_default()
}

/// The winning cell of `key`, if any.
pub fn winner<D: ReadDoc>(
    doc: &D,
    key: &str,
    policy: ConflictPolicy,
    origin: NodeId,
) -> Option<Cell> {
    let mut all = cells(doc, key);
    rank(&mut all, policy, origin);
    all.into_iter().next()
}

/// The cells of one entry of a pass over the root map (`map_range`): decoded from the value
/// the pass gives, or, when the key holds concurrent values, from all of them (`get_all`, which
/// costs Automerge a seek of its own, so only then).
pub fn entry_cells<D: ReadDoc>(doc: &D, entry: &automerge::iter::MapRangeItem<'_>) -> Vec<Cell> {
    if entry.conflict {
        return cells(doc, &entry.key);
    }
    match &entry.value {
        automerge::ValueRef::Scalar(automerge::ScalarValueRef::Bytes(b)) => {
            decode(b).into_iter().collect()
        }
        _ => Vec::new(),
    }
}

/// Highest stamp among all cells of all root keys: a new local write must be stamped above it.
/// One pass over the root map.
pub fn max_hlc<D: ReadDoc>(doc: &D) -> Option<Hlc> {
    doc.map_range(ROOT, ..)
        .flat_map(|e| entry_cells(doc, &e).into_iter().map(|c| c.hlc))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    #[test]
    fn cells_round_trip_and_reject_garbage() {
        let h = Hlc {
            wall_ms: 42,
            logical: 3,
            node: NodeId(Uuid::from_bytes([7; 16])),
        };
        for v in [
            None,
            Some(json!("x")),
            Some(json!({"lat": 1.0, "lon": 2.0})),
        ] {
            let b = encode(h, v.as_ref());
            assert_eq!(decode(&b), Some(Cell { hlc: h, value: v }));
        }
        assert_eq!(decode(b"short"), None);
        let mut b = encode(h, Some(&json!(1)));
        b[0] = 9;
        assert_eq!(decode(&b), None, "unknown version");
        let mut b = encode(h, None);
        b.push(1);
        assert_eq!(decode(&b), None, "cleared cell with trailing bytes");
    }
}
