//! Field values: the JSON shapes of SPEC section 4 ("Values in JSON"), validated against a field
//! definition and returned in canonical form.

use serde_json::Value as Json;

use super::{FieldDef, FieldType};

/// Longest `text`, `email`, `url` or `user` value in bytes.
pub const MAX_TEXT_BYTES: usize = 4 * 1024;
/// Longest `longtext` value in bytes (well under the API body limit).
pub const MAX_LONGTEXT_BYTES: usize = 256 * 1024;

/// What is wrong with a value or a field definition.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    #[error("unknown field {0:?}")]
    UnknownField(String),
    #[error("field {field:?}: {message}")]
    Invalid { field: String, message: String },
    #[error("field {0:?} is required")]
    Missing(String),
}

impl ValueError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ValueError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Validate `v` for `def`. `null` is handled by the caller (it clears a field).
pub fn validate_value(def: &FieldDef, v: &Json) -> Result<Json, ValueError> {
    let bad = |m: String| ValueError::invalid(&def.name, m);
    let want = |what: &str| {
        bad(format!(
            "expected {what} for a {} field, got {}",
            def.ty.name(),
            kind(v)
        ))
    };
    match def.ty {
        FieldType::Text | FieldType::User | FieldType::Longtext => {
            let s = v.as_str().ok_or_else(|| want("a string"))?;
            let max = if def.ty == FieldType::Longtext {
                MAX_LONGTEXT_BYTES
            } else {
                MAX_TEXT_BYTES
            };
            if s.len() > max {
                return Err(bad(format!(
                    "value is {} bytes; at most {max} allowed",
                    s.len()
                )));
            }
            if def.ty == FieldType::Text && s.contains(['\n', '\r']) {
                return Err(bad(
                    "text is one line; use a longtext field for several".into()
                ));
            }
            Ok(v.clone())
        }
        FieldType::Email => {
            let s = v.as_str().ok_or_else(|| want("a string"))?;
            let ok = s.len() <= MAX_TEXT_BYTES
                && !s.contains(char::is_whitespace)
                && s.split_once('@').is_some_and(|(l, d)| {
                    !l.is_empty()
                        && d.contains('.')
                        && !d.starts_with('.')
                        && !d.ends_with('.')
                        && !d.contains('@')
                });
            if !ok {
                return Err(bad(format!(
                    "{s:?} is not an email address like name@example.org"
                )));
            }
            Ok(v.clone())
        }
        FieldType::Url => {
            let s = v.as_str().ok_or_else(|| want("a string"))?;
            if s.len() > MAX_TEXT_BYTES || url::Url::parse(s).is_err() {
                return Err(bad(format!(
                    "{s:?} is not an absolute URL like https://example.org/x"
                )));
            }
            Ok(v.clone())
        }
        FieldType::Number => {
            let n = v.as_number().ok_or_else(|| want("a number"))?;
            if n.as_f64().is_none_or(|f| !f.is_finite()) {
                return Err(bad("number is out of range".into()));
            }
            Ok(v.clone())
        }
        FieldType::Boolean => v
            .as_bool()
            .map(Json::Bool)
            .ok_or_else(|| want("true or false")),
        FieldType::Date => {
            let s = v.as_str().ok_or_else(|| want("a date string"))?;
            chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .ok()
                .filter(|_| s.len() == 10)
                .ok_or_else(|| bad(format!("{s:?} is not a date like 2026-11-22")))?;
            Ok(v.clone())
        }
        FieldType::Datetime => {
            let s = v.as_str().ok_or_else(|| want("an RFC 3339 string"))?;
            chrono::DateTime::parse_from_rfc3339(s).map_err(|_| {
                bad(format!(
                    "{s:?} is not an RFC 3339 date-time like 2026-11-22T18:45:00Z"
                ))
            })?;
            Ok(v.clone())
        }
        FieldType::Choice => {
            let s = v.as_str().ok_or_else(|| want("one of the options"))?;
            if !def.options.iter().any(|o| o == s) {
                return Err(bad(format!(
                    "{s:?} is not one of the options: {}",
                    def.options.join(", ")
                )));
            }
            Ok(v.clone())
        }
        FieldType::Multichoice => {
            let arr = v.as_array().ok_or_else(|| want("an array of options"))?;
            let mut out: Vec<&str> = Vec::with_capacity(arr.len());
            for x in arr {
                let s = x
                    .as_str()
                    .ok_or_else(|| want("an array of option strings"))?;
                if !def.options.iter().any(|o| o == s) {
                    return Err(bad(format!(
                        "{s:?} is not one of the options: {}",
                        def.options.join(", ")
                    )));
                }
                if !out.contains(&s) {
                    out.push(s);
                }
            }
            // Canonical order is the schema's option order, so equal selections compare equal.
            out.sort_by_key(|s| def.options.iter().position(|o| o == s));
            Ok(Json::Array(
                out.into_iter()
                    .map(|s| Json::String(s.to_string()))
                    .collect(),
            ))
        }
        FieldType::Location => {
            let obj = v
                .as_object()
                .ok_or_else(|| want(r#"{"lat": f, "lon": f}"#))?;
            if obj.len() != 2 {
                return Err(bad(r#"location takes exactly {"lat": f, "lon": f}"#.into()));
            }
            let lat = obj.get("lat").and_then(Json::as_f64);
            let lon = obj.get("lon").and_then(Json::as_f64);
            match (lat, lon) {
                (Some(lat), Some(lon))
                    if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) =>
                {
                    Ok(serde_json::json!({"lat": lat, "lon": lon}))
                }
                _ => Err(bad(
                    "lat must be within -90..90 and lon within -180..180".into()
                )),
            }
        }
    }
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(ty: FieldType, options: &[&str]) -> FieldDef {
        FieldDef {
            name: "f".into(),
            ty,
            label: "f".into(),
            required: false,
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn check(ty: FieldType, v: Json, expect: Option<Json>) {
        let got = validate_value(&def(ty, &["a", "b", "c"]), &v).ok();
        assert_eq!(got, expect, "{ty:?} {v}");
    }

    #[test]
    fn accepts_each_type_in_its_json_shape() {
        check(FieldType::Text, json!("x"), Some(json!("x")));
        check(FieldType::Number, json!(7), Some(json!(7)));
        check(FieldType::Number, json!(7.5), Some(json!(7.5)));
        check(FieldType::Boolean, json!(true), Some(json!(true)));
        check(
            FieldType::Date,
            json!("2026-11-22"),
            Some(json!("2026-11-22")),
        );
        check(
            FieldType::Datetime,
            json!("2026-11-22T10:00:00+01:00"),
            Some(json!("2026-11-22T10:00:00+01:00")),
        );
        check(FieldType::Choice, json!("b"), Some(json!("b")));
        check(
            FieldType::Multichoice,
            json!(["c", "a", "c"]),
            Some(json!(["a", "c"])),
        );
        check(FieldType::Email, json!("a@b.org"), Some(json!("a@b.org")));
        check(
            FieldType::Url,
            json!("https://x.org/p"),
            Some(json!("https://x.org/p")),
        );
        check(
            FieldType::Location,
            json!({"lat": 1, "lon": 2.5}),
            Some(json!({"lat": 1.0, "lon": 2.5})),
        );
        check(FieldType::User, json!("amina"), Some(json!("amina")));
        check(FieldType::Longtext, json!("a\nb"), Some(json!("a\nb")));
    }

    #[test]
    fn refuses_wrong_shapes() {
        check(FieldType::Text, json!(1), None);
        check(FieldType::Text, json!("a\nb"), None);
        check(FieldType::Number, json!("7"), None);
        check(FieldType::Boolean, json!("yes"), None);
        check(FieldType::Date, json!("2026-13-01"), None);
        check(FieldType::Date, json!("2026-1-1"), None);
        check(FieldType::Datetime, json!("yesterday"), None);
        check(FieldType::Choice, json!("z"), None);
        check(FieldType::Multichoice, json!("a"), None);
        check(FieldType::Multichoice, json!(["a", "z"]), None);
        check(FieldType::Email, json!("not-an-email"), None);
        check(FieldType::Url, json!("/relative"), None);
        check(FieldType::Location, json!({"lat": 91, "lon": 0}), None);
        check(
            FieldType::Location,
            json!({"lat": 1, "lon": 0, "alt": 3}),
            None,
        );
    }

    #[test]
    fn field_definitions_are_checked() {
        assert!(def(FieldType::Choice, &[]).validate().is_err());
        assert!(def(FieldType::Choice, &["a", "a"]).validate().is_err());
        assert!(def(FieldType::Text, &["a"]).validate().is_err());
        assert!(def(FieldType::Choice, &["a"]).validate().is_ok());
        let mut d = def(FieldType::Text, &[]);
        d.name = "1abc".into();
        assert!(d.validate().is_err());
    }
}
