//! The benchmark workload of `../shared/bench-peers/` (README "Workload"), ported exactly so
//! trackersync and the peer systems sync identical records: 10-field case records generated
//! with xorshift32 seeded by `i + 1`.

use serde_json::{json, Map, Value as Json};

const FIRST: [&str; 12] = [
    "Amina", "Juan", "Fatima", "Omar", "Grace", "Samuel", "Leila", "Pedro", "Nadia", "Kofi",
    "Maria", "Ahmed",
];
const LAST: [&str; 10] = [
    "Okafor", "Hassan", "Garcia", "Mensah", "Haddad", "Kamara", "Silva", "Nguyen", "Abebe",
    "Rahman",
];
pub const STATUS: [&str; 5] = [
    "open",
    "in_progress",
    "referred",
    "closed",
    "pending_review",
];
const LOC: [&str; 6] = [
    "Camp A / Block 3",
    "Camp B / Block 7",
    "Town Centre",
    "North District",
    "Riverside",
    "Border Post 2",
];
const NOTES: [&str; 4] = [
    "Child separated from caregiver during relocation; follow-up visit scheduled.",
    "Needs medical referral; family tracing started with neighbouring district.",
    "Caregiver identified, verification interview pending.",
    "Attending temporary learning space; psychosocial support recommended.",
];

struct XorShift(u32);

impl XorShift {
    fn new(seed: u32) -> Self {
        XorShift(if seed == 0 { 1 } else { seed })
    }
    fn next(&mut self) -> f64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        self.0 = s;
        s as f64 / 4_294_967_296.0
    }
    fn pick<'a>(&mut self, list: &[&'a str]) -> &'a str {
        list[(self.next() * list.len() as f64).floor() as usize]
    }
}

/// Record `i`, keys in the harness's order.
pub fn record(i: u64) -> Map<String, Json> {
    let mut r = XorShift::new((i + 1) as u32);
    let day = (r.next() * 365.0).floor() as i64;
    let first = r.pick(&FIRST);
    let last = r.pick(&LAST);
    let age = (r.next() * 17.0).floor() as i64 + 1;
    let sex = if r.next() < 0.5 { "female" } else { "male" };
    let status = r.pick(&STATUS);
    let risk = (r.next() * 3.0).floor() as i64 + 1;
    let location = r.pick(&LOC);
    let notes = r.pick(&NOTES);
    let base = chrono::NaiveDate::from_ymd_opt(2024, 1, 1).expect("valid date")
        + chrono::Days::new(day as u64);
    let updated = base + chrono::Days::new(7);
    let mut m = Map::new();
    m.insert("case_id".into(), json!(format!("CASE-{i:07}")));
    m.insert("name".into(), json!(format!("{first} {last}")));
    m.insert("age".into(), json!(age));
    m.insert("sex".into(), json!(sex));
    m.insert("status".into(), json!(status));
    m.insert("risk_level".into(), json!(risk));
    m.insert("location".into(), json!(location));
    m.insert(
        "registration_date".into(),
        json!(base.format("%Y-%m-%d").to_string()),
    );
    m.insert(
        "last_updated".into(),
        json!(format!("{}T00:00:00.000Z", updated.format("%Y-%m-%d"))),
    );
    m.insert("notes".into(), json!(notes));
    m
}

/// The tracker schema for the records.
pub fn tracker_body() -> Json {
    json!({"name": "cases", "fields": [
        {"name": "case_id", "type": "text", "required": true},
        {"name": "name", "type": "text"},
        {"name": "age", "type": "number"},
        {"name": "sex", "type": "choice", "options": ["female", "male"]},
        {"name": "status", "type": "choice", "options": STATUS},
        {"name": "risk_level", "type": "number"},
        {"name": "location", "type": "text"},
        {"name": "registration_date", "type": "date"},
        {"name": "last_updated", "type": "datetime"},
        {"name": "notes", "type": "longtext"},
    ]})
}

/// Indices edited by catch-up round `round` (README "The 1 % edit").
#[allow(dead_code)]
pub fn catchup_indices(n: u64, round: u64) -> Vec<u64> {
    let k = ((n as f64 * 0.01).round() as u64).max(1);
    let step = n / k;
    (0..k).map(|j| j * step + round % step).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::Value as Json;

    /// Lines printed by `node gen-records.mjs 3 --start 41` and `1 --start 99999` in
    /// ../shared/bench-peers: the port must produce the same records.
    const REFERENCE: [(u64, &str); 2] = [
        (
            42,
            r#"{"case_id":"CASE-0000042","name":"Nadia Kamara","age":14,"sex":"female","status":"referred","risk_level":3,"location":"North District","registration_date":"2024-01-01","last_updated":"2024-01-08T00:00:00.000Z","notes":"Attending temporary learning space; psychosocial support recommended."}"#,
        ),
        (
            99999,
            r#"{"case_id":"CASE-0099999","name":"Nadia Hassan","age":12,"sex":"female","status":"in_progress","risk_level":1,"location":"Camp B / Block 7","registration_date":"2024-03-01","last_updated":"2024-03-08T00:00:00.000Z","notes":"Needs medical referral; family tracing started with neighbouring district."}"#,
        ),
    ];

    #[test]
    fn records_match_the_harness_byte_for_byte() {
        for (i, line) in REFERENCE {
            let theirs: Json = serde_json::from_str(line).expect("reference json");
            assert_eq!(Json::Object(super::record(i)), theirs, "record {i}");
        }
    }

    #[test]
    fn catchup_rounds_follow_the_harness() {
        assert_eq!(super::catchup_indices(1000, 1)[..3], [1, 101, 201]);
        assert_eq!(super::catchup_indices(1000, 2).len(), 10);
    }
}
