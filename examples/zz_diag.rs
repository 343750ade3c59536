use automerge::{AutoCommit, ReadDoc};
fn main() {
    let f = std::env::args().nth(1).unwrap();
    let b = trackersync::bundle::read(&std::fs::read(f).unwrap()).unwrap();
    println!("{} docs", b.docs.len());
    let mut ids = std::collections::HashSet::new();
    for d in &b.docs {
        if !ids.insert(d.id) {
            println!("dup {}", d.id);
        }
        match AutoCommit::load(&d.data) {
            Err(e) => println!("{} {:?} len {} err {e}", d.id, d.kind, d.data.len()),
            Ok(mut doc) => {
                let mut h = doc.get_heads().into_iter().map(|h| h.0).collect::<Vec<_>>();
                h.sort();
                let mut r = d.heads.clone();
                r.sort();
                if h != r {
                    println!("{} heads differ", d.id);
                }
                let _ = doc.length(automerge::ROOT);
            }
        }
    }
}
