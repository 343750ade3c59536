//! Property tests of the pure core: K replicas of one item make random concurrent edits
//! (same-field ones included), clears, deletes and restores, and merge in random orders. All
//! replicas must end identical, and under the `newer` policy every field must equal the write
//! with the highest (HLC, node) ever made to it.

use std::collections::BTreeMap;

use automerge::AutoCommit;
use proptest::prelude::*;
use serde_json::{json, Value as Json};
use uuid::Uuid;

use super::*;
use crate::hlc::{HlcState, NodeId, DEFAULT_MAX_DRIFT_MS};

const FIELDS: [&str; 3] = ["a", "b", "c"];

#[derive(Clone, Debug)]
enum Op {
    Set {
        r: usize,
        field: usize,
        value: u8,
    },
    Clear {
        r: usize,
        field: usize,
    },
    Delete {
        r: usize,
    },
    Restore {
        r: usize,
    },
    Merge {
        into: usize,
        from: usize,
    },
    /// Move a replica's wall clock, backwards included (skew).
    Clock {
        r: usize,
        wall: u64,
    },
}

fn op(k: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..k, 0..FIELDS.len(), any::<u8>()).prop_map(|(r, field, value)| Op::Set { r, field, value }),
        1 => (0..k, 0..FIELDS.len()).prop_map(|(r, field)| Op::Clear { r, field }),
        1 => (0..k).prop_map(|r| Op::Delete { r }),
        1 => (0..k).prop_map(|r| Op::Restore { r }),
        3 => (0..k, 0..k).prop_map(|(into, from)| Op::Merge { into, from }),
        1 => (0..k, 1_000u64..1_050).prop_map(|(r, wall)| Op::Clock { r, wall }),
    ]
}

struct Replica {
    doc: AutoCommit,
    clock: HlcState,
    wall: u64,
}

/// A write as the oracle records it: which register, its stamp and value.
#[derive(Clone, Debug)]
struct Write {
    key: String,
    hlc: Hlc,
    value: Option<Json>,
}

fn node(i: usize) -> NodeId {
    NodeId(Uuid::from_bytes([i as u8 + 1; 16]))
}

fn run(k: usize, ops: Vec<Op>, policy: ConflictPolicy) -> Result<(), TestCaseError> {
    let id = Uuid::from_bytes([9; 16]);
    let tracker = Uuid::from_bytes([8; 16]);
    let mut writes: Vec<Write> = Vec::new();
    let mut first = HlcState::new(node(0), DEFAULT_MAX_DRIFT_MS);
    let created = first.tick(1_000);
    let origin_doc = ItemDoc::create(
        node(0),
        tracker,
        "n-1",
        created,
        &[("a".into(), Some(json!(0)))],
    )
    .expect("create");
    writes.push(Write {
        key: "a".into(),
        hlc: created,
        value: Some(json!(0)),
    });
    let mut replicas: Vec<Replica> = (0..k)
        .map(|i| {
            let mut doc = origin_doc.clone();
            doc.set_actor(actor_for(node(i)));
            let mut clock = HlcState::new(node(i), DEFAULT_MAX_DRIFT_MS);
            if i == 0 {
                clock = first.clone();
            }
            Replica {
                doc,
                clock,
                wall: 1_000,
            }
        })
        .collect();

    let stamp = |r: &mut Replica| {
        // The one-pass maxima (the receive path's and a loaded document's) agree with a
        // lookup of every value of every key.
        let floor = automerge::ReadDoc::keys(&r.doc, automerge::ROOT)
            .flat_map(|k| register::cells(&r.doc, &k).into_iter().map(|c| c.hlc))
            .max();
        assert_eq!(register::max_hlc(&r.doc), floor);
        let (_, one_pass) = ItemDoc::new(&mut r.doc)
            .view_with_max(Uuid::nil(), ConflictPolicy::Newer)
            .expect("view");
        assert_eq!(one_pass, floor);
        if let Some(f) = floor {
            r.clock.witness(f);
        }
        r.clock.tick(r.wall)
    };

    for op in ops {
        match op {
            Op::Set { r, field, value } => {
                let rep = &mut replicas[r];
                let h = stamp(rep);
                let v = Some(json!(value));
                ItemDoc::new(&mut rep.doc)
                    .set_fields(h, &[(FIELDS[field].into(), v.clone())])
                    .expect("set");
                writes.push(Write {
                    key: FIELDS[field].into(),
                    hlc: h,
                    value: v,
                });
            }
            Op::Clear { r, field } => {
                let rep = &mut replicas[r];
                let h = stamp(rep);
                ItemDoc::new(&mut rep.doc)
                    .set_fields(h, &[(FIELDS[field].into(), None)])
                    .expect("clear");
                writes.push(Write {
                    key: FIELDS[field].into(),
                    hlc: h,
                    value: None,
                });
            }
            Op::Delete { r } | Op::Restore { r } => {
                let deleted = matches!(op, Op::Delete { .. });
                let rep = &mut replicas[r];
                let h = stamp(rep);
                ItemDoc::new(&mut rep.doc)
                    .set_deleted(h, deleted)
                    .expect("delete");
                writes.push(Write {
                    key: "_deleted".into(),
                    hlc: h,
                    value: Some(Json::Bool(deleted)),
                });
            }
            Op::Merge { into, from } if into != from => {
                let mut other = replicas[from].doc.clone();
                replicas[into].doc.merge(&mut other).expect("merge");
            }
            Op::Merge { .. } => {}
            Op::Clock { r, wall } => replicas[r].wall = wall,
        }
    }

    // Heal: everyone merges everyone.
    for into in 0..k {
        for from in 0..k {
            if into != from {
                let mut other = replicas[from].doc.clone();
                replicas[into].doc.merge(&mut other).expect("merge");
            }
        }
    }

    let views: Vec<ItemView> = replicas
        .iter_mut()
        .map(|r| ItemDoc::new(&mut r.doc).view(id, policy).expect("view"))
        .collect();
    for v in &views[1..] {
        prop_assert_eq!(v, &views[0], "replicas diverged");
    }
    let conflicts: Vec<_> = replicas
        .iter_mut()
        .map(|r| {
            ItemDoc::new(&mut r.doc)
                .conflicts(policy)
                .expect("conflicts")
        })
        .collect();
    for c in &conflicts[1..] {
        prop_assert_eq!(c, &conflicts[0], "conflict lists diverged");
    }

    if policy == ConflictPolicy::Newer {
        let mut latest: BTreeMap<&str, &Write> = BTreeMap::new();
        for w in &writes {
            let e = latest.entry(w.key.as_str()).or_insert(w);
            if w.hlc > e.hlc {
                *e = w;
            }
        }
        for f in FIELDS {
            let expect = latest.get(f).and_then(|w| w.value.clone());
            prop_assert_eq!(views[0].fields.get(f).cloned(), expect, "field {}", f);
        }
        let last_edit = writes
            .iter()
            .filter(|w| w.key != "_deleted")
            .map(|w| w.hlc)
            .max();
        let expect_deleted = latest
            .get("_deleted")
            .is_some_and(|w| w.value == Some(Json::Bool(true)) && Some(w.hlc) > last_edit);
        prop_assert_eq!(views[0].deleted, expect_deleted);
        prop_assert_eq!(Some(views[0].updated), writes.iter().map(|w| w.hlc).max());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_to_the_newest_write(k in 2usize..5, ops in prop::collection::vec(op(4), 1..60)) {
        let ops = ops.into_iter().filter(|o| match o {
            Op::Set { r, .. } | Op::Clear { r, .. } | Op::Delete { r } | Op::Restore { r } | Op::Clock { r, .. } => *r < k,
            Op::Merge { into, from } => *into < k && *from < k,
        }).collect();
        run(k, ops, ConflictPolicy::Newer)?;
    }

    #[test]
    fn replicas_converge_under_origin_policy(k in 2usize..5, ops in prop::collection::vec(op(4), 1..60)) {
        let ops = ops.into_iter().filter(|o| match o {
            Op::Set { r, .. } | Op::Clear { r, .. } | Op::Delete { r } | Op::Restore { r } | Op::Clock { r, .. } => *r < k,
            Op::Merge { into, from } => *into < k && *from < k,
        }).collect();
        run(k, ops, ConflictPolicy::Origin)?;
    }
}

#[test]
fn newer_stamp_beats_automerge_actor_order() {
    // Actor order would pick node 9's value (higher actor); the HLC says node 1 wrote last.
    let id = Uuid::from_bytes([1; 16]);
    let mut a = ItemDoc::create(
        node(8),
        Uuid::from_bytes([2; 16]),
        "x-1",
        Hlc {
            wall_ms: 10,
            logical: 0,
            node: node(8),
        },
        &[],
    )
    .expect("create");
    let mut b = a.clone();
    b.set_actor(actor_for(node(0)));
    ItemDoc::new(&mut a)
        .set_fields(
            Hlc {
                wall_ms: 100,
                logical: 0,
                node: node(8),
            },
            &[("s".into(), Some(json!("old")))],
        )
        .expect("set");
    ItemDoc::new(&mut b)
        .set_fields(
            Hlc {
                wall_ms: 200,
                logical: 0,
                node: node(0),
            },
            &[("s".into(), Some(json!("new")))],
        )
        .expect("set");
    a.merge(&mut b.clone()).expect("merge");
    b.merge(&mut a.clone()).expect("merge");
    for d in [&mut a, &mut b] {
        let doc = ItemDoc::new(d);
        assert_eq!(
            doc.view(id, ConflictPolicy::Newer).expect("view").fields["s"],
            json!("new")
        );
        let c = doc.conflicts(ConflictPolicy::Newer).expect("conflicts");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].losers[0].value, Some(json!("old")));
        // Under `origin`, the origin node's (node 8) write wins instead.
        assert_eq!(
            doc.view(id, ConflictPolicy::Origin).expect("view").fields["s"],
            json!("old")
        );
    }
}

#[test]
fn history_lists_changes_oldest_first() {
    let h = |w| Hlc {
        wall_ms: w,
        logical: 0,
        node: node(0),
    };
    let mut d = ItemDoc::create(
        node(0),
        Uuid::nil(),
        "x-1",
        h(10),
        &[("a".into(), Some(json!(1)))],
    )
    .expect("create");
    let mut doc = ItemDoc::new(&mut d);
    doc.set_fields(h(20), &[("a".into(), None), ("b".into(), Some(json!("x")))])
        .expect("set");
    doc.set_deleted(h(30), true).expect("delete");
    let hist = doc.history();
    assert_eq!(hist.len(), 3);
    assert_eq!(hist[0].fields["a"], Some(json!(1)));
    assert_eq!(hist[1].fields["a"], None);
    assert_eq!(hist[1].fields["b"], Some(json!("x")));
    assert_eq!(hist[2].deleted, Some(true));
    assert!(hist.windows(2).all(|w| w[0].hlc < w[1].hlc));
}
