//! Replays the committed fuzz corpus (`transfer/fuzz/corpus/TARGET/*`), the hand-made seeds
//! (`transfer/fuzz/seeds/TARGET/*`) and the inputs of crashes once found
//! (`transfer/fuzz/regressions/TARGET/*`) through the same harness
//! functions the cargo-fuzz targets call (`transfer::fuzzing`).
//!
//! This is how CI keeps every fuzz target's findings passing on the stable toolchain,
//! without nightly or libFuzzer: a harness invariant that breaks on any stored input fails
//! this test, naming the file. New inputs come from `scripts/fuzz.sh` (nightly).

use std::path::{Path, PathBuf};

type Harness = fn(&[u8]);

const TARGETS: [(&str, Harness); 5] = [
    ("wire_control", transfer::fuzzing::wire_control),
    ("wire_chunk_header", transfer::fuzzing::wire_chunk_header),
    ("manifest_builder", transfer::fuzzing::manifest_builder),
    ("chunk_tracker", transfer::fuzzing::chunk_tracker),
    ("recv_session", transfer::fuzzing::recv_session),
];

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = read
        .map(|e| e.expect("corpus directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_input_passes_its_harness() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failed = Vec::new();
    for (target, harness) in TARGETS {
        let corpus = files(&fuzz.join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "no committed corpus for {target} (run scripts/fuzz.sh --minimise)"
        );
        let seeds = files(&fuzz.join("seeds").join(target));
        let regressions = files(&fuzz.join("regressions").join(target));
        for file in corpus.iter().chain(&seeds).chain(&regressions) {
            let data = std::fs::read(file).expect("read corpus file");
            if std::panic::catch_unwind(|| harness(&data)).is_err() {
                failed.push(file.display().to_string());
            }
        }
        println!(
            "{target}: {} corpus, {} seed and {} regression inputs replayed",
            corpus.len(),
            seeds.len(),
            regressions.len()
        );
    }
    assert!(
        failed.is_empty(),
        "inputs failing their harness: {failed:#?}"
    );
}
