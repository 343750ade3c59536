//! Turning `field=value` arguments into typed JSON by the tracker's schema.

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value as Json};

/// Parse `name=value` (typed by the field's type, empty means clear) and `name:=<json>`
/// (raw JSON) arguments. `fields` is the tracker's `fields` array as the API returns it.
pub fn parse_assignments(args: &[String], fields: &[Json]) -> Result<Map<String, Json>> {
    let mut out = Map::new();
    for arg in args {
        if let Some((name, raw)) = arg.split_once(":=") {
            let v = serde_json::from_str(raw).map_err(|e| anyhow!("{name}:= expects JSON: {e}"))?;
            out.insert(name.to_string(), v);
            continue;
        }
        let Some((name, raw)) = arg.split_once('=') else {
            bail!("expected FIELD=VALUE (or FIELD:=JSON), got {arg:?}");
        };
        let ty = fields
            .iter()
            .find(|f| f["name"] == name)
            .and_then(|f| f["type"].as_str())
            .ok_or_else(|| {
                let names: Vec<&str> = fields.iter().filter_map(|f| f["name"].as_str()).collect();
                anyhow!(
                    "unknown field {name:?}; this tracker has: {}",
                    names.join(", ")
                )
            })?;
        out.insert(name.to_string(), typed(name, ty, raw)?);
    }
    Ok(out)
}

fn typed(name: &str, ty: &str, raw: &str) -> Result<Json> {
    if raw.is_empty() {
        return Ok(Json::Null);
    }
    Ok(match ty {
        "number" => {
            if let Ok(i) = raw.parse::<i64>() {
                Json::from(i)
            } else {
                let f: f64 = raw
                    .parse()
                    .map_err(|_| anyhow!("{name} is a number field; {raw:?} is not a number"))?;
                serde_json::Number::from_f64(f)
                    .map(Json::Number)
                    .ok_or_else(|| anyhow!("{name}: {raw:?} is not a finite number"))?
            }
        }
        "boolean" => match raw.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" => Json::Bool(true),
            "false" | "no" | "n" | "0" => Json::Bool(false),
            _ => bail!("{name} is a boolean field; use true or false"),
        },
        "multichoice" => Json::Array(
            raw.split(',')
                .map(|s| Json::String(s.trim().to_string()))
                .collect(),
        ),
        "location" => {
            let (lat, lon) = raw
                .split_once(',')
                .ok_or_else(|| anyhow!("{name} is a location field; use LAT,LON"))?;
            let p = |s: &str| {
                s.trim()
                    .parse::<f64>()
                    .map_err(|_| anyhow!("{name}: {s:?} is not a coordinate"))
            };
            serde_json::json!({"lat": p(lat)?, "lon": p(lon)?})
        }
        _ => Json::String(raw.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_follow_field_types() {
        let fields = vec![
            json!({"name": "name", "type": "text"}),
            json!({"name": "age", "type": "number"}),
            json!({"name": "ok", "type": "boolean"}),
            json!({"name": "tags", "type": "multichoice"}),
            json!({"name": "at", "type": "location"}),
        ];
        let args: Vec<String> = [
            "name=Amina",
            "age=7",
            "ok=yes",
            "tags=a,b",
            "at=1.5,-2",
            "name2:=3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let m = parse_assignments(&args, &fields).expect("parse");
        assert_eq!(m["name"], json!("Amina"));
        assert_eq!(m["age"], json!(7));
        assert_eq!(m["ok"], json!(true));
        assert_eq!(m["tags"], json!(["a", "b"]));
        assert_eq!(m["at"], json!({"lat": 1.5, "lon": -2.0}));
        assert_eq!(m["name2"], json!(3));
        assert!(parse_assignments(&["age=seven".into()], &fields).is_err());
        assert!(parse_assignments(&["nope=1".into()], &fields).is_err());
        assert!(parse_assignments(&["noequals".into()], &fields).is_err());
        assert_eq!(
            parse_assignments(&["age=".into()], &fields).expect("clear")["age"],
            Json::Null
        );
    }
}
