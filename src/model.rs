//! Trackers, field types and values (SPEC section 2). Pure: validation turns user JSON into the
//! canonical JSON stored in a field register, or says exactly what is wrong.

mod field;
mod value;

pub use field::{validate_name, ConflictPolicy, FieldDef, FieldType, Tracker};

/// Bounds on schemas.
pub mod field_limits {
    pub use super::field::{MAX_FIELDS, MAX_NAME_LEN, MAX_OPTIONS};
}
pub use value::{validate_value, ValueError};
