//! Field definitions and tracker schemas.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ValueError;

/// Longest tracker or field name; names appear in URLs and CLI arguments.
pub const MAX_NAME_LEN: usize = 64;
/// Most options a choice field may list.
pub const MAX_OPTIONS: usize = 256;
/// Most fields one tracker may have.
pub const MAX_FIELDS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    Text,
    Longtext,
    Number,
    Boolean,
    Date,
    Datetime,
    Choice,
    Multichoice,
    Email,
    Url,
    Location,
    User,
}

impl FieldType {
    pub const ALL: [FieldType; 12] = [
        FieldType::Text,
        FieldType::Longtext,
        FieldType::Number,
        FieldType::Boolean,
        FieldType::Date,
        FieldType::Datetime,
        FieldType::Choice,
        FieldType::Multichoice,
        FieldType::Email,
        FieldType::Url,
        FieldType::Location,
        FieldType::User,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FieldType::Text => "text",
            FieldType::Longtext => "longtext",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::Date => "date",
            FieldType::Datetime => "datetime",
            FieldType::Choice => "choice",
            FieldType::Multichoice => "multichoice",
            FieldType::Email => "email",
            FieldType::Url => "url",
            FieldType::Location => "location",
            FieldType::User => "user",
        }
    }

    pub fn parse(s: &str) -> Option<FieldType> {
        FieldType::ALL.into_iter().find(|t| t.name() == s)
    }

    pub fn has_options(self) -> bool {
        matches!(self, FieldType::Choice | FieldType::Multichoice)
    }
}

/// One field of a tracker. `name` is the stable key values are stored under.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldDef {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    pub label: String,
    pub required: bool,
    pub options: Vec<String>,
}

impl FieldDef {
    /// Check the definition itself (not a value).
    pub fn validate(&self) -> Result<(), ValueError> {
        validate_name(&self.name).map_err(|m| ValueError::invalid(&self.name, m))?;
        if self.label.chars().count() > 256 {
            return Err(ValueError::invalid(
                &self.name,
                "label is longer than 256 characters",
            ));
        }
        if self.ty.has_options() {
            if self.options.is_empty() {
                return Err(ValueError::invalid(
                    &self.name,
                    "a choice field needs at least one option",
                ));
            }
            if self.options.len() > MAX_OPTIONS {
                return Err(ValueError::invalid(
                    &self.name,
                    "too many options (at most 256)",
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for o in &self.options {
                if o.is_empty() || o.len() > 256 {
                    return Err(ValueError::invalid(
                        &self.name,
                        "options must be 1 to 256 bytes long",
                    ));
                }
                if !seen.insert(o) {
                    return Err(ValueError::invalid(
                        &self.name,
                        format!("option {o:?} is listed twice"),
                    ));
                }
            }
        } else if !self.options.is_empty() {
            return Err(ValueError::invalid(
                &self.name,
                format!("a {} field takes no options", self.ty.name()),
            ));
        }
        Ok(())
    }
}

/// Tracker and field names: a letter, then letters, digits, `_` or `-`; at most 64 bytes.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok
        || name.len() > MAX_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "invalid name {name:?}: use a letter followed by letters, digits, '_' or '-' (at most {MAX_NAME_LEN})"
        ));
    }
    Ok(())
}

/// How concurrent writes to one field are resolved (SPEC section 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The most recent write by HLC wins.
    #[default]
    Newer,
    /// A write made on the item's origin node wins; otherwise the most recent.
    Origin,
}

impl ConflictPolicy {
    pub fn name(self) -> &'static str {
        match self {
            ConflictPolicy::Newer => "newer",
            ConflictPolicy::Origin => "origin",
        }
    }
}

/// A tracker schema as read from its document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tracker {
    pub id: Uuid,
    pub name: String,
    pub fields: Vec<FieldDef>,
    pub conflict_policy: ConflictPolicy,
}

impl Tracker {
    pub fn field(&self, name: &str) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.name == name)
    }
}
