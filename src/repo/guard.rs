//! Bounds on a peer's Automerge bytes, checked before Automerge sees them.
//!
//! automerge 0.12 can be made to use unbounded memory by small inputs: a compressed change
//! chunk is inflated without a limit, and run-length encoded columns can declare billions of
//! rows that the loader materialises (fuzzing found a 158-byte document that grew past 2 GB).
//! `catch_unwind` cannot contain that. So we walk the chunk and column headers of the storage
//! format ourselves, sum each column's run lengths without materialising them, inflate
//! compressed parts with a cap, and refuse what is over the bounds. Chunk kinds we never
//! produce (bundles) are refused too.

use std::io::Read;

/// Rows (operations, changes) one column may declare. Tracker items have tens to thousands.
pub const MAX_ROWS: u64 = 1_000_000;
/// Bytes all compressed parts of one document may inflate to.
pub const MAX_INFLATED: u64 = 64 * 1024 * 1024;
/// Actors, dependencies or heads one chunk may list.
const MAX_LIST: u64 = 100_000;
/// Columns one chunk may declare.
const MAX_COLUMNS: u64 = 1024;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

type Result<T> = std::result::Result<T, String>;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| "length out of range".to_string())?;
        if n > self.0.len() {
            return Err(format!("{n} bytes declared, {} left", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn uleb(&mut self) -> Result<u64> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = *self.take(1)?.first().expect("one byte");
            value |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("LEB128 number too long".into())
    }

    fn sleb(&mut self) -> Result<i64> {
        let mut value: i64 = 0;
        let mut shift = 0;
        loop {
            let byte = *self.take(1)?.first().expect("one byte");
            value |= i64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
            shift += 7;
            if byte & 0x80 == 0 {
                if shift < 64 && byte & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Ok(value);
            }
            if shift >= 70 {
                return Err("LEB128 number too long".into());
            }
        }
    }

    fn list(&mut self, what: &str) -> Result<u64> {
        let n = self.uleb()?;
        if n > MAX_LIST {
            return Err(format!("{n} {what} (at most {MAX_LIST})"));
        }
        Ok(n)
    }
}

/// Inflation budget shared by one document's chunks.
struct Budget(u64);

impl Budget {
    fn inflate(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(data)
            .take(self.0 + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("bad compressed data: {e}"))?;
        if out.len() as u64 > self.0 {
            return Err(format!(
                "compressed data inflates past {MAX_INFLATED} bytes"
            ));
        }
        self.0 -= out.len() as u64;
        Ok(out)
    }
}

/// Check `bytes` (one or more concatenated chunks) against the bounds.
pub fn check(bytes: &[u8]) -> Result<()> {
    let mut r = Reader(bytes);
    let mut budget = Budget(MAX_INFLATED);
    if r.is_empty() {
        return Err("no data".into());
    }
    while !r.is_empty() {
        if r.take(4)? != MAGIC {
            return Err("not an Automerge chunk".into());
        }
        r.take(4)?; // checksum
        let kind = r.take(1)?[0];
        let len = r.uleb()?;
        let data = r.take(len)?;
        match kind {
            0 => document(data, &mut budget)?,
            1 => change(data, &mut budget)?,
            2 => {
                let inflated = budget.inflate(data)?;
                change(&inflated, &mut budget)?
            }
            other => return Err(format!("chunk type {other} is not accepted from peers")),
        }
    }
    Ok(())
}

fn skip_actors(r: &mut Reader<'_>) -> Result<()> {
    for _ in 0..r.list("actors")? {
        let n = r.uleb()?;
        r.take(n)?;
    }
    Ok(())
}

fn column_specs(r: &mut Reader<'_>) -> Result<Vec<(u64, u64)>> {
    let n = r.uleb()?;
    if n > MAX_COLUMNS {
        return Err(format!("{n} columns (at most {MAX_COLUMNS})"));
    }
    (0..n).map(|_| Ok((r.uleb()?, r.uleb()?))).collect()
}

fn columns(r: &mut Reader<'_>, specs: &[(u64, u64)], budget: &mut Budget) -> Result<()> {
    for &(spec, len) in specs {
        let raw = r.take(len)?;
        let inflated;
        let data = if spec & 0b1000 != 0 {
            inflated = budget.inflate(raw)?;
            &inflated[..]
        } else {
            raw
        };
        let rows = match spec & 0b111 {
            // group, actor, integer, value metadata: RLE of unsigned numbers
            0 | 1 | 2 | 6 => rle(data, Value::Unsigned)?,
            3 => rle(data, Value::Signed)?,
            4 => boolean(data)?,
            5 => rle(data, Value::Str)?,
            // raw values: their lengths come from the metadata column
            _ => 0,
        };
        if rows > MAX_ROWS {
            return Err(format!(
                "a column declares {rows} rows (at most {MAX_ROWS})"
            ));
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Value {
    Unsigned,
    Signed,
    Str,
}

fn skip_value(r: &mut Reader<'_>, v: Value) -> Result<()> {
    match v {
        Value::Unsigned => r.uleb().map(drop),
        Value::Signed => r.sleb().map(drop),
        Value::Str => {
            let n = r.uleb()?;
            r.take(n).map(drop)
        }
    }
}

/// Rows of a run-length encoded column, without materialising them.
fn rle(data: &[u8], v: Value) -> Result<u64> {
    let mut r = Reader(data);
    let mut rows: u64 = 0;
    while !r.is_empty() {
        let n = r.sleb()?;
        if n > 0 {
            skip_value(&mut r, v)?;
            rows = rows.saturating_add(n as u64);
        } else if n < 0 {
            let literals = n.unsigned_abs();
            if literals > MAX_ROWS {
                return Err(format!("{literals} literal values (at most {MAX_ROWS})"));
            }
            for _ in 0..literals {
                skip_value(&mut r, v)?;
            }
            rows = rows.saturating_add(literals);
        } else {
            rows = rows.saturating_add(r.uleb()?);
        }
        if rows > MAX_ROWS {
            return Err(format!("a column declares over {MAX_ROWS} rows"));
        }
    }
    Ok(rows)
}

fn boolean(data: &[u8]) -> Result<u64> {
    let mut r = Reader(data);
    let mut rows: u64 = 0;
    while !r.is_empty() {
        rows = rows.saturating_add(r.uleb()?);
        if rows > MAX_ROWS {
            return Err(format!("a column declares over {MAX_ROWS} rows"));
        }
    }
    Ok(rows)
}

fn document(data: &[u8], budget: &mut Budget) -> Result<()> {
    let mut r = Reader(data);
    skip_actors(&mut r)?;
    let heads = r.list("heads")?;
    r.take(heads * 32)?;
    let change_specs = column_specs(&mut r)?;
    let op_specs = column_specs(&mut r)?;
    columns(&mut r, &change_specs, budget)?;
    columns(&mut r, &op_specs, budget)?;
    // The rest holds head indices (one number per head).
    Ok(())
}

fn change(data: &[u8], budget: &mut Budget) -> Result<()> {
    let mut r = Reader(data);
    let deps = r.list("dependencies")?;
    r.take(deps * 32)?;
    let actor = r.uleb()?;
    r.take(actor)?;
    r.uleb()?; // seq
    r.uleb()?; // start op
    r.sleb()?; // time
    let message = r.uleb()?;
    r.take(message)?;
    skip_actors(&mut r)?;
    let specs = column_specs(&mut r)?;
    columns(&mut r, &specs, budget)
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;

    use super::*;

    #[test]
    fn honest_documents_and_changes_pass() {
        let mut doc = automerge::AutoCommit::new();
        for i in 0..200 {
            doc.put(
                automerge::ROOT,
                format!("k{}", i % 20),
                format!("value {i} with some text"),
            )
            .expect("put");
            doc.commit();
        }
        let heads = doc.get_heads();
        doc.put(automerge::ROOT, "late", 1).expect("put");
        check(&doc.save()).expect("document");
        check(&doc.save_nocompress()).expect("uncompressed document");
        check(&doc.save_after(&heads)).expect("change chunk");
        check(&[doc.save(), doc.save_after(&heads)].concat()).expect("concatenated");
    }

    #[test]
    fn bombs_and_junk_are_refused() {
        // A document chunk whose first op column claims 2^40 rows in one run.
        let mut data = vec![0u8]; // no actors
        data.push(0); // no heads
        data.push(0); // no change columns
        data.extend([1, 0x12]); // one op column: spec 0x12 (integer), length 7 follows
        data.push(7);
        data.extend([0x80, 0x80, 0x80, 0x80, 0x80, 0x20]); // sleb 2^40
        data.push(1); // the repeated value
        let mut chunk = MAGIC.to_vec();
        chunk.extend([0; 4]);
        chunk.push(0);
        chunk.push(data.len() as u8);
        chunk.extend(&data);
        assert!(check(&chunk).expect_err("bomb").contains("rows"));

        assert!(check(b"").is_err());
        assert!(check(b"not automerge at all").is_err());
        let mut bundle = MAGIC.to_vec();
        bundle.extend([0, 0, 0, 0, 3, 0]);
        assert!(check(&bundle).expect_err("bundle").contains("chunk type 3"));
        let mut truncated = MAGIC.to_vec();
        truncated.extend([0, 0, 0, 0, 0, 50, 1, 2]);
        assert!(check(&truncated).is_err());
    }
}

#[cfg(test)]
mod findings {
    /// Inputs the fuzzer found (first byte = document kind, rest = Automerge bytes).
    fn input(rel: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(rel);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))[1..].to_vec()
    }

    /// Found by `cargo fuzz run apply_document`: 158 bytes that grew automerge's memory past
    /// 2 GB. The guard must refuse them before Automerge sees them.
    #[test]
    fn memory_bomb_document_is_refused() {
        let why =
            super::check(&input("regressions/apply_document/oom-ba693390")).expect_err("refused");
        println!("refused: {why}");
    }
}
