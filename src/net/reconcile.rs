//! Set reconciliation by range fingerprints, for a pair with no common checkpoint.
//!
//! Both sides keep a digest per document (see [`crate::store::doc_digest`]), ordered by id. A
//! range's summary is its document count and the XOR of its digests. The requester asks for
//! summaries of id ranges; the responder lists a small range's documents outright and splits a
//! large one into [`PARTS`] sub-ranges at its own quantiles, with their summaries. The
//! requester compares each with the same range of its own index: equal ranges are done,
//! differing listed ranges name the documents to fetch, differing large ones are asked for in
//! the next round. Rounds grow with log(n); bytes with the number of differing documents.
//!
//! Pure functions over the digest index; the network loop drives the rounds.

use std::collections::BTreeMap;
use std::ops::Bound;

use uuid::Uuid;

use super::wire::{pb, WireError};

/// A range this small is listed document by document.
pub const LEAF: usize = 32;
/// A larger range is split into this many sub-ranges.
pub const PARTS: usize = 16;
/// Ranges one request may name.
pub const MAX_RANGES: usize = 128;
/// Documents a listed range may carry (honest responders list at most `LEAF`).
const MAX_LISTED: usize = 4 * LEAF;

/// Ids in `[lo, hi)`; `hi = None` is unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub lo: Uuid,
    pub hi: Option<Uuid>,
}

impl IdRange {
    pub const ALL: IdRange = IdRange {
        lo: Uuid::nil(),
        hi: None,
    };

    fn bounds(&self) -> (Bound<Uuid>, Bound<Uuid>) {
        (
            Bound::Included(self.lo),
            self.hi.map_or(Bound::Unbounded, Bound::Excluded),
        )
    }

    pub fn to_wire(self) -> pb::IdRange {
        pb::IdRange {
            lo: self.lo.as_bytes().to_vec(),
            hi: self.hi.map(|h| h.as_bytes().to_vec()).unwrap_or_default(),
        }
    }

    pub fn from_wire(r: &pb::IdRange) -> Result<IdRange, WireError> {
        let lo = super::wire::uuid(&r.lo, "range start")?;
        let hi = if r.hi.is_empty() {
            None
        } else {
            Some(super::wire::uuid(&r.hi, "range end")?)
        };
        if hi.is_some_and(|h| h <= lo) {
            return Err(WireError("empty or inverted id range".into()));
        }
        Ok(IdRange { lo, hi })
    }
}

/// Count and fingerprint of a range of the index.
fn summary_of(index: &BTreeMap<Uuid, u128>, range: IdRange) -> (u64, u128) {
    index
        .range(range.bounds())
        .fold((0, 0), |(n, fp), (_, d)| (n + 1, fp ^ d))
}

fn fingerprint(entries: &[(&Uuid, &u128)]) -> Vec<u8> {
    entries
        .iter()
        .fold(0u128, |fp, (_, d)| fp ^ **d)
        .to_le_bytes()
        .to_vec()
}

fn listed(range: IdRange, entries: &[(&Uuid, &u128)]) -> pb::RangeSummary {
    pb::RangeSummary {
        range: Some(range.to_wire()),
        count: entries.len() as u64,
        fingerprint: fingerprint(entries),
        listed: true,
        docs: entries
            .iter()
            .map(|(id, d)| pb::DocDigest {
                id: id.as_bytes().to_vec(),
                digest: d.to_le_bytes().to_vec(),
            })
            .collect(),
        split: Vec::new(),
    }
}

/// The responder's answer for each requested range.
pub fn summarize(index: &BTreeMap<Uuid, u128>, ranges: &[IdRange]) -> Vec<pb::RangeSummary> {
    ranges
        .iter()
        .map(|&range| {
            let entries: Vec<(&Uuid, &u128)> = index.range(range.bounds()).collect();
            if entries.len() <= LEAF {
                return listed(range, &entries);
            }
            let n = entries.len();
            let mut split = Vec::with_capacity(PARTS);
            for k in 0..PARTS {
                let (start, end) = (k * n / PARTS, (k + 1) * n / PARTS);
                let sub = IdRange {
                    lo: if k == 0 { range.lo } else { *entries[start].0 },
                    hi: if k + 1 == PARTS {
                        range.hi
                    } else {
                        Some(*entries[end].0)
                    },
                };
                // Summaries only, even for small parts: listing all of them would cost more
                // than the round trip that lists just the differing ones.
                let part = &entries[start..end];
                split.push(pb::RangeSummary {
                    range: Some(sub.to_wire()),
                    count: part.len() as u64,
                    fingerprint: fingerprint(part),
                    listed: false,
                    docs: Vec::new(),
                    split: Vec::new(),
                });
            }
            pb::RangeSummary {
                range: Some(range.to_wire()),
                count: n as u64,
                fingerprint: Vec::new(),
                listed: false,
                docs: Vec::new(),
                split,
            }
        })
        .collect()
}

/// What the requester learns from a reply: ranges to ask about next, documents to fetch.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub next: Vec<IdRange>,
    pub wanted: Vec<Uuid>,
}

/// Compare the responder's summaries with our index. Malformed summaries are an error (the
/// peer misbehaves).
pub fn compare(
    index: &BTreeMap<Uuid, u128>,
    summaries: &[pb::RangeSummary],
) -> Result<Outcome, WireError> {
    let mut out = Outcome::default();
    for s in summaries {
        compare_one(index, s, 0, &mut out)?;
    }
    Ok(out)
}

fn compare_one(
    index: &BTreeMap<Uuid, u128>,
    s: &pb::RangeSummary,
    depth: u8,
    out: &mut Outcome,
) -> Result<(), WireError> {
    let range = IdRange::from_wire(
        s.range
            .as_ref()
            .ok_or_else(|| WireError("range summary without a range".into()))?,
    )?;
    if s.listed {
        if s.docs.len() > MAX_LISTED {
            return Err(WireError(format!("{} documents listed", s.docs.len())));
        }
        for d in &s.docs {
            let id = super::wire::uuid(&d.id, "document id")?;
            let digest: [u8; 16] = d
                .digest
                .as_slice()
                .try_into()
                .map_err(|_| WireError("a digest is not 16 bytes".into()))?;
            if id < range.lo || range.hi.is_some_and(|h| id >= h) {
                return Err(WireError("listed document outside its range".into()));
            }
            if index.get(&id) != Some(&u128::from_le_bytes(digest)) {
                out.wanted.push(id);
            }
        }
        return Ok(());
    }
    if !s.split.is_empty() {
        if depth > 0 || s.split.len() > PARTS {
            return Err(WireError("malformed range split".into()));
        }
        for sub in &s.split {
            compare_one(index, sub, depth + 1, out)?;
        }
        return Ok(());
    }
    let fingerprint: [u8; 16] = s
        .fingerprint
        .as_slice()
        .try_into()
        .map_err(|_| WireError("a fingerprint is not 16 bytes".into()))?;
    if summary_of(index, range) != (s.count, u128::from_le_bytes(fingerprint)) {
        out.next.push(range);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Run the whole exchange between two indexes; returns (documents wanted, rounds).
    fn reconcile(ours: &BTreeMap<Uuid, u128>, theirs: &BTreeMap<Uuid, u128>) -> (Vec<Uuid>, usize) {
        let mut pending = vec![IdRange::ALL];
        let mut wanted = Vec::new();
        let mut rounds = 0;
        while !pending.is_empty() {
            rounds += 1;
            let ask: Vec<IdRange> = pending.drain(..pending.len().min(MAX_RANGES)).collect();
            // Through the wire encoding, as the network does.
            let reply = summarize(theirs, &ask);
            let out = compare(ours, &reply).expect("honest summaries");
            pending.extend(out.next);
            wanted.extend(out.wanted);
        }
        wanted.sort();
        (wanted, rounds)
    }

    fn index(ids: &[u128], salt: u128) -> BTreeMap<Uuid, u128> {
        ids.iter()
            .map(|&i| {
                (
                    Uuid::from_u128(i),
                    i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt,
                )
            })
            .collect()
    }

    proptest! {
        /// The requester ends up wanting exactly the documents the responder has in another
        /// state or it lacks, whatever the two sets.
        #[test]
        fn finds_exactly_the_differing_documents(
            common in proptest::collection::btree_set(any::<u128>(), 0..600),
            only_theirs in proptest::collection::btree_set(any::<u128>(), 0..40),
            only_ours in proptest::collection::btree_set(any::<u128>(), 0..40),
            changed in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let common: Vec<u128> = common.into_iter().collect();
            let mut ours = index(&common, 0);
            let mut theirs = ours.clone();
            for i in &only_theirs {
                theirs.entry(Uuid::from_u128(*i)).or_insert(*i);
            }
            for i in &only_ours {
                ours.entry(Uuid::from_u128(*i)).or_insert(1);
            }
            for c in changed {
                if !common.is_empty() {
                    let id = Uuid::from_u128(common[c.index(common.len())]);
                    // A change of state is a new random-looking digest.
                    *theirs.get_mut(&id).expect("common") ^= id.as_u128().wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
                }
            }
            let expected: std::collections::BTreeSet<Uuid> = theirs
                .iter()
                .filter(|(id, d)| ours.get(id) != Some(d))
                .map(|(id, _)| *id)
                .collect();
            let (wanted, _) = reconcile(&ours, &theirs);
            prop_assert_eq!(wanted, expected.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn identical_sets_confirm_in_one_round_and_few_differences_cost_little() {
        let ids: Vec<u128> = (0..100_000u128).map(|i| i * 7919 + (i << 80)).collect();
        let ours = index(&ids, 0);
        let (wanted, rounds) = reconcile(&ours, &ours.clone());
        assert!(wanted.is_empty());
        assert_eq!(rounds, 1);

        let mut theirs = ours.clone();
        let changed: Vec<Uuid> = ids
            .iter()
            .step_by(10_000)
            .map(|&i| Uuid::from_u128(i))
            .collect();
        for id in &changed {
            *theirs.get_mut(id).expect("present") ^= 1;
        }
        // Count the summaries exchanged: it follows the 10 differences, not the 100,000 ids.
        let mut pending = vec![IdRange::ALL];
        let mut summaries = 0;
        let mut wanted = Vec::new();
        while !pending.is_empty() {
            let ask: Vec<IdRange> = std::mem::take(&mut pending);
            let reply = summarize(&theirs, &ask);
            summaries += reply
                .iter()
                .map(|s| {
                    1 + s.split.len()
                        + s.docs.len()
                        + s.split.iter().map(|x| x.docs.len()).sum::<usize>()
                })
                .sum::<usize>();
            let out = compare(&ours, &reply).expect("honest");
            pending.extend(out.next);
            wanted.extend(out.wanted);
        }
        wanted.sort();
        let mut expected = changed.clone();
        expected.sort();
        assert_eq!(wanted, expected);
        assert!(
            summaries < 2_000,
            "{summaries} summaries for 10 differences"
        );
    }

    #[test]
    fn malformed_summaries_are_refused() {
        let ours = index(&[1, 2, 3], 0);
        let bad_range = pb::RangeSummary {
            range: Some(pb::IdRange {
                lo: vec![0; 15],
                hi: Vec::new(),
            }),
            ..Default::default()
        };
        assert!(compare(&ours, &[bad_range]).is_err());
        let inverted = pb::RangeSummary {
            range: Some(
                IdRange {
                    lo: Uuid::from_u128(5),
                    hi: Some(Uuid::from_u128(5)),
                }
                .to_wire(),
            ),
            ..Default::default()
        };
        assert!(compare(&ours, &[inverted]).is_err());
        let outside = pb::RangeSummary {
            range: Some(
                IdRange {
                    lo: Uuid::from_u128(5),
                    hi: Some(Uuid::from_u128(9)),
                }
                .to_wire(),
            ),
            listed: true,
            docs: vec![pb::DocDigest {
                id: Uuid::from_u128(1).as_bytes().to_vec(),
                digest: vec![0; 16],
            }],
            ..Default::default()
        };
        assert!(compare(&ours, &[outside]).is_err());
        let too_many = pb::RangeSummary {
            range: Some(IdRange::ALL.to_wire()),
            listed: true,
            docs: vec![
                pb::DocDigest {
                    id: Uuid::from_u128(1).as_bytes().to_vec(),
                    digest: vec![0; 16]
                };
                MAX_LISTED + 1
            ],
            ..Default::default()
        };
        assert!(compare(&ours, &[too_many]).is_err());
        let nested = summarize(&index(&(0..1000).collect::<Vec<_>>(), 0), &[IdRange::ALL]);
        let mut deep = nested[0].clone();
        deep.split[0].split = nested[0].split.clone();
        assert!(compare(&ours, &[deep]).is_err());
    }
}
