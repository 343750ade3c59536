//! Entry points shared by the fuzz targets (`fuzz/`) and the corpus replay test, so CI replays
//! every committed input against exactly the code the fuzzer exercised.
//!
//! Both must return normally for any input: no panic, no hang, no huge allocation.

use std::sync::{Arc, OnceLock};

use uuid::Uuid;

use crate::hlc::{NodeId, SystemClock, DEFAULT_MAX_DRIFT_MS};
use crate::repo::{RemoteDoc, Repo};
use crate::store::DocKind;

/// Decode bytes as every wire message (plain, and as a deflated frame) and convert what
/// decodes, as the network loop does.
pub fn wire_decode(data: &[u8]) {
    use prost::Message;
    if let Ok(req) = crate::net::pb::Request::decode(data) {
        if let Some(crate::net::pb::request::Body::Fetch(f)) = req.body {
            for h in f.docs {
                let _ = crate::net::wire_uuid(&h.id);
                let _ = crate::net::wire_heads(&h.heads);
            }
        }
    }
    let inflated = crate::net::wire_inflate_response(data);
    for res in [crate::net::pb::Response::decode(data).ok(), inflated.ok()]
        .into_iter()
        .flatten()
    {
        if let Some(crate::net::pb::response::Body::Pull(p)) = res.body {
            for e in p.entries {
                let _ = crate::net::wire_doc(e);
            }
        }
    }
}

fn repo() -> &'static Repo {
    static REPO: OnceLock<(tempfile_dir::Dir, Repo)> = OnceLock::new();
    &REPO
        .get_or_init(|| {
            let dir = tempfile_dir::Dir::new();
            let repo = Repo::open(
                &dir.0,
                NodeId(Uuid::from_bytes([1; 16])),
                Arc::new(SystemClock::default()),
                DEFAULT_MAX_DRIFT_MS,
            )
            .expect("open fuzz repo");
            (dir, repo)
        })
        .1
}

/// A fuzz input as a peer's document: first byte picks the kind (even = item) and the ids,
/// the rest is the Automerge data.
pub fn document_from_input(data: &[u8]) -> Option<RemoteDoc> {
    let (&kind, bytes) = data.split_first()?;
    Some(RemoteDoc {
        id: Uuid::from_bytes([kind; 16]),
        kind: if kind % 2 == 0 {
            DocKind::Item
        } else {
            DocKind::Tracker
        },
        tracker: Uuid::from_bytes([kind; 16]),
        heads: vec![[kind; 32]],
        data: bytes.to_vec(),
        seq: 1,
    })
}

/// Offer bytes to the repo as a peer's document. Every outcome but a crash is acceptable.
pub fn apply_document(data: &[u8]) {
    if let Some(doc) = document_from_input(data) {
        let _ = repo().apply_remote(vec![doc], 1);
    }
}

/// A scratch directory removed at exit (the fuzzer keeps one repo for the whole run).
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!("trackersync-fuzz-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Replays every committed fuzz input (fuzz/corpus and fuzz/regressions) through the
    /// functions the fuzz targets call.
    #[test]
    fn committed_fuzz_inputs_replay_cleanly() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut replayed = 0;
        for (target, run) in [
            ("wire_decode", super::wire_decode as fn(&[u8])),
            ("apply_document", super::apply_document),
        ] {
            for dir in [
                root.join("corpus").join(target),
                root.join("regressions").join(target),
            ] {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let data = std::fs::read(e.path()).expect("read input");
                    run(&data);
                    replayed += 1;
                }
            }
        }
        assert!(
            replayed >= 10,
            "expected a committed corpus under fuzz/, replayed {replayed}"
        );
    }
}
