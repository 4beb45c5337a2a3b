//! Every file under `regressions/<target>/` (crashes `make soak` found, hand-made hostile
//! inputs) and every seed goes through its target, so they stay tested without nightly.

use std::fs;
use std::path::Path;

use kez_fuzz::{TARGETS, seeds, target};

#[test]
fn regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut ran = 0;
    for entry in fs::read_dir(&root).expect("regressions/ exists") {
        let dir = entry.expect("an entry").path();
        let name = dir
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        let run = target(&name).unwrap_or_else(|| panic!("regressions/{name} names no target"));
        for file in fs::read_dir(&dir).expect("a directory") {
            let path = file.expect("an entry").path();
            let input = fs::read(&path).expect("readable");
            eprintln!("{}", path.display());
            run(&input);
            ran += 1;
        }
    }
    assert!(ran > 0);
}

#[test]
fn every_target_has_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    for (name, _) in TARGETS {
        assert!(root.join(name).is_dir(), "regressions/{name} is missing");
    }
}

/// Seeds reach the success path of every target: a harness that refuses everything fuzzes
/// nothing but its own refusals.
#[test]
fn seeds_are_accepted() {
    for (name, run) in TARGETS {
        let seeds = seeds::seeds(name);
        assert!(!seeds.is_empty(), "{name} has no seeds");
        let accepted = seeds.iter().filter(|seed| run(seed)).count();
        assert!(accepted > 0, "{name}: no seed accepted");
    }
}

/// Every target on empty, tiny and mode-switching inputs.
#[test]
fn short_inputs() {
    for (_, run) in TARGETS {
        for input in [&b""[..], b"\0", b"\x01", b"\xff", b"\n", b"{}", b"\x01{}"] {
            run(input);
        }
    }
}
