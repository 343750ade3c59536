//! A tracker's schema as an Automerge document, so schemas replicate and merge like items:
//! adding a field on one node reaches the others, and concurrent additions all survive.
//!
//! Root map: `o` origin node (string), `c` creation stamp, `n` name, `p` conflict policy,
//! `f.<field>` one register per field definition. Registers resolve by newest stamp.
//! Field order is the order fields were added (`pos` stamp inside the definition).

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{AutoCommit, ReadDoc, ROOT};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use uuid::Uuid;

use crate::hlc::{Hlc, NodeId};
use crate::item::{ItemError, RootBuilder};
use crate::model::{ConflictPolicy, FieldDef, FieldType, Tracker};
use crate::register;

const KEY_ORIGIN: &str = "o";
const KEY_CREATED: &str = "c";
const KEY_NAME: &str = "n";
const KEY_POLICY: &str = "p";
const FIELD_PREFIX: &str = "f.";

/// A field definition as stored in its register.
#[derive(Serialize, Deserialize)]
struct StoredField {
    #[serde(rename = "type")]
    ty: FieldType,
    label: String,
    required: bool,
    options: Vec<String>,
    /// Stamp of the first definition: fields list in the order they were added.
    pos: String,
}

/// A field definition as its register cell.
fn field_cell(hlc: Hlc, f: &FieldDef, pos: &str) -> Vec<u8> {
    let stored = StoredField {
        ty: f.ty,
        label: f.label.clone(),
        required: f.required,
        options: f.options.clone(),
        pos: pos.to_string(),
    };
    let json = serde_json::to_value(stored).expect("field definition serializes");
    register::encode(hlc, Some(&json))
}

pub struct TrackerDoc<'a> {
    doc: &'a mut AutoCommit,
}

impl<'a> TrackerDoc<'a> {
    pub fn create(
        node: NodeId,
        hlc: Hlc,
        name: &str,
        fields: &[FieldDef],
        policy: ConflictPolicy,
    ) -> Result<AutoCommit, ItemError> {
        let mut root = RootBuilder::default();
        root.str(KEY_ORIGIN, node.to_string());
        root.bytes(KEY_CREATED, register::encode(hlc, None));
        root.bytes(
            KEY_NAME,
            register::encode(hlc, Some(&Json::String(name.into()))),
        );
        root.bytes(
            KEY_POLICY,
            register::encode(hlc, Some(&Json::String(policy.name().into()))),
        );
        for (i, f) in fields.iter().enumerate() {
            // Fields created together keep their given order: same stamp, position suffix.
            root.bytes(
                &format!("{FIELD_PREFIX}{}", f.name),
                field_cell(hlc, f, &format!("{hlc}/{i:04}")),
            );
        }
        let mut doc = root.build(node)?;
        doc.commit_with(CommitOptions::default().with_time((hlc.wall_ms / 1000) as i64));
        Ok(doc)
    }

    pub fn new(doc: &'a mut AutoCommit) -> Self {
        TrackerDoc { doc }
    }

    fn put_field(&mut self, hlc: Hlc, f: &FieldDef, pos: &str) -> Result<(), ItemError> {
        self.doc.put(
            ROOT,
            format!("{FIELD_PREFIX}{}", f.name),
            field_cell(hlc, f, pos),
        )?;
        Ok(())
    }

    pub fn add_field(&mut self, hlc: Hlc, f: &FieldDef) -> Result<(), ItemError> {
        self.put_field(hlc, f, &format!("{hlc}/0000"))?;
        self.doc
            .commit_with(CommitOptions::default().with_time((hlc.wall_ms / 1000) as i64));
        Ok(())
    }

    pub fn set_policy(&mut self, hlc: Hlc, policy: ConflictPolicy) -> Result<(), ItemError> {
        self.doc.put(
            ROOT,
            KEY_POLICY,
            register::encode(hlc, Some(&Json::String(policy.name().into()))),
        )?;
        self.doc
            .commit_with(CommitOptions::default().with_time((hlc.wall_ms / 1000) as i64));
        Ok(())
    }

    pub fn view(&self, id: Uuid) -> Result<Tracker, ItemError> {
        let newest =
            |key: &str| register::winner(&*self.doc, key, ConflictPolicy::Newer, NodeId::default());
        register::winner(
            &*self.doc,
            KEY_CREATED,
            ConflictPolicy::Newer,
            NodeId::default(),
        )
        .ok_or(ItemError::NotAnItem("tracker without creation stamp"))?;
        let name = newest(KEY_NAME)
            .and_then(|c| c.value)
            .and_then(|v| v.as_str().map(str::to_string))
            .ok_or(ItemError::NotAnItem("tracker without a name"))?;
        let conflict_policy = match newest(KEY_POLICY).and_then(|c| c.value) {
            Some(Json::String(s)) if s == "origin" => ConflictPolicy::Origin,
            _ => ConflictPolicy::Newer,
        };
        let mut fields: Vec<(String, FieldDef)> = Vec::new();
        for key in self.doc.keys(ROOT) {
            let Some(name) = key.strip_prefix(FIELD_PREFIX) else {
                continue;
            };
            let Some(stored) = newest(&key)
                .and_then(|c| c.value)
                .and_then(|v| serde_json::from_value::<StoredField>(v).ok())
            else {
                continue;
            };
            let def = FieldDef {
                name: name.to_string(),
                ty: stored.ty,
                label: stored.label,
                required: stored.required,
                options: stored.options,
            };
            fields.push((stored.pos, def));
        }
        fields.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
        Ok(Tracker {
            id,
            name,
            fields: fields.into_iter().map(|(_, f)| f).collect(),
            conflict_policy,
        })
    }
}
