use automerge::{AutoCommit, ReadDoc};
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let id: uuid::Uuid = std::env::args().nth(2).unwrap().parse().unwrap();
    let store = trackersync::store::Store::open(std::path::Path::new(&dir)).unwrap();
    let d = store.load_doc(id).unwrap().unwrap();
    println!("meta {:?}", d.meta);
    println!(
        "snapshot {} chunks {:?} seqs {:?}",
        d.snapshot.len(),
        d.chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
        d.chunk_seqs
    );
    match AutoCommit::load(&d.snapshot) {
        Ok(mut doc) => {
            println!("snapshot loads: heads {:?}", doc.get_heads());
            for c in &d.chunks {
                println!(
                    " incr {:?} heads {:?}",
                    doc.load_incremental(c),
                    doc.get_heads()
                );
            }
            println!("keys {:?}", doc.keys(automerge::ROOT).collect::<Vec<_>>());
        }
        Err(e) => println!("snapshot err {e}"),
    }
    let mut doc = AutoCommit::new();
    println!(
        "incremental of snapshot {:?} heads {:?}",
        doc.load_incremental(&d.snapshot),
        doc.get_heads()
    );
}
