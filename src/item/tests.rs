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

/// A stamp of node 0 at wall time `w`.
fn at(w: u64) -> Hlc {
    Hlc {
        wall_ms: w,
        logical: 0,
        node: node(0),
    }
}

/// An item node 0 created at wall time 10, with field `a` = 1.
fn item_with_a() -> AutoCommit {
    ItemDoc::create(
        node(0),
        Uuid::nil(),
        "x-1",
        at(10),
        &[("a".into(), Some(json!(1)))],
    )
    .expect("create")
}

#[test]
fn history_lists_changes_oldest_first() {
    let mut d = item_with_a();
    let mut doc = ItemDoc::new(&mut d);
    doc.set_fields(
        at(20),
        &[("a".into(), None), ("b".into(), Some(json!("x")))],
    )
    .expect("set");
    doc.set_deleted(at(30), true).expect("delete");
    let hist = doc.history();
    assert_eq!(hist.len(), 3);
    assert_eq!(hist[0].fields["a"], Some(json!(1)));
    assert_eq!(hist[1].fields["a"], None);
    assert_eq!(hist[1].fields["b"], Some(json!("x")));
    assert_eq!(hist[2].deleted, Some(true));
    assert!(hist.windows(2).all(|w| w[0].hlc < w[1].hlc));
}

/// How one root key of a generated first change is written.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// As `ItemDoc::create` writes it.
    Honest,
    /// The other value type (bytes for a string key, a string for a register).
    WrongType,
    /// Bytes that do not decode as a cell (a string that is not an id, for identity keys).
    Garbage,
    Absent,
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        6 => Just(Shape::Honest),
        1 => Just(Shape::WrongType),
        1 => Just(Shape::Garbage),
        1 => Just(Shape::Absent),
    ]
}

fn json_value() -> impl Strategy<Value = Option<Json>> {
    prop_oneof![
        Just(None),
        any::<i64>().prop_map(|n| Some(json!(n))),
        "[a-z ]{0,12}".prop_map(|s| Some(json!(s))),
        any::<bool>().prop_map(|b| Some(json!(b))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A receiver reads a new item from its first change alone (`view_of_creation`) only when
    /// that gives exactly what loading the document gives, and always for honest creations.
    #[test]
    fn a_creation_change_reads_as_the_loaded_document(
        shapes in prop::collection::vec(shape(), 5),
        fields in prop::collection::vec(("[a-c]", json_value(), 0u64..5), 0..6),
        deleted in prop::option::of((any::<bool>(), 0u64..5)),
        unknown_key in any::<bool>(),
        other_actor in any::<bool>(),
        origin_policy in any::<bool>(),
    ) {
        let origin = node(0);
        let tracker = Uuid::from_bytes([8; 16]);
        let id = Uuid::from_bytes([9; 16]);
        let stamp = |w: u64| Hlc { wall_ms: 1_000 + w, logical: 0, node: origin };
        let policy = if origin_policy { ConflictPolicy::Origin } else { ConflictPolicy::Newer };
        let mut root = RootBuilder::default();
        let put_str = |root: &mut RootBuilder, key: &str, value: String, shape: Shape| match shape {
            Shape::Honest => root.str(key, value),
            Shape::WrongType => root.bytes(key, value.into_bytes()),
            Shape::Garbage => root.str(key, "not an id".into()),
            Shape::Absent => {}
        };
        put_str(&mut root, KEY_TRACKER, tracker.to_string(), shapes[0]);
        put_str(&mut root, KEY_ORIGIN, origin.to_string(), shapes[1]);
        put_str(&mut root, KEY_DISPLAY, "x-1".into(), shapes[2]);
        let put_cell = |root: &mut RootBuilder, key: &str, cell: Vec<u8>, shape: Shape| match shape {
            Shape::Honest => root.bytes(key, cell),
            Shape::WrongType => root.str(key, "a string".into()),
            Shape::Garbage => root.bytes(key, vec![7; 3]),
            Shape::Absent => {}
        };
        put_cell(&mut root, KEY_CREATED, register::encode(stamp(0), None), shapes[3]);
        for (name, value, w) in &fields {
            root.bytes(&field_key(name), register::encode(stamp(*w), value.as_ref()));
        }
        if let Some((d, w)) = deleted {
            put_cell(&mut root, KEY_DELETED, register::encode(stamp(w), Some(&json!(d))), shapes[4]);
        }
        if unknown_key {
            root.str("z", "ignored".into());
        }
        let mut doc = root.build(if other_actor { node(1) } else { origin }).expect("build");
        doc.commit_with(commit_options(stamp(0)));
        let bytes = doc.save_after(&[]);

        let change = automerge::Change::try_from(&bytes[..]).expect("one change");
        let fast = view_of_creation(id, &change, |_| policy);
        let mut loaded = AutoCommit::load(&bytes).expect("load");
        let full = ItemDoc::new(&mut loaded).view_by(id, |_| policy);
        if let Some(fast) = &fast {
            prop_assert_eq!(Some(fast), full.as_ref().ok());
        }
        let honest = shapes.iter().take(4).all(|s| matches!(s, Shape::Honest))
            && (deleted.is_none() || matches!(shapes[4], Shape::Honest))
            && !unknown_key
            && !other_actor;
        if honest {
            prop_assert!(fast.is_some(), "an honest creation is read from its change");
        }
    }
}

#[test]
fn only_a_first_change_reads_as_a_creation() {
    let mut d = item_with_a();
    let first = d.get_last_local_change().expect("created").clone();
    assert!(view_of_creation(Uuid::nil(), &first, |_| ConflictPolicy::Newer).is_some());
    ItemDoc::new(&mut d)
        .set_fields(at(20), &[("a".into(), Some(json!(2)))])
        .expect("set");
    let second = d.get_last_local_change().expect("edited").clone();
    assert!(
        view_of_creation(Uuid::nil(), &second, |_| ConflictPolicy::Newer).is_none(),
        "an edit depends on the creation and overwrites its value"
    );
}
