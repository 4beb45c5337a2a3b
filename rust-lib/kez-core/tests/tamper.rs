//! Any single-byte change to a valid chain must be rejected: every byte of every link of every
//! good vector is covered (a signature, a counter-signature, the canonical-form rule or the
//! hash links catch it), version 2 links and their device operations included.

use kez_core::Sigchain;
use proptest::prelude::*;

fn vectors_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors/sigchain")
}

/// The names of the committed good vectors (`good-*.json`), sorted.
fn good_vector_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter_map(|file| Some(file.strip_suffix(".json")?.to_owned()))
        .filter(|name| name.starts_with("good-"))
        .collect();
    names.sort();
    names
}

fn good_chain(name: &str) -> Vec<Vec<u8>> {
    let path = vectors_dir().join(format!("{name}.json"));
    let vector: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let links: Vec<Vec<u8>> = vector["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|link| link.as_str().unwrap().as_bytes().to_vec())
        .collect();
    Sigchain::verify(&links).expect("the good vector verifies before tampering");
    links
}

fn tampered(links: &[Vec<u8>], link: usize, offset: usize, byte: u8) -> Vec<Vec<u8>> {
    let mut copy = links.to_vec();
    copy[link][offset] = byte;
    copy
}

#[test]
fn flipping_the_low_bit_of_any_byte_is_rejected() {
    let names = good_vector_names();
    for expected in ["good-minimal", "good-full", "good-devices"] {
        assert!(names.iter().any(|name| name == expected), "{expected}");
    }
    for name in names {
        let links = good_chain(&name);
        let mut cases = 0;
        for (i, link) in links.iter().enumerate() {
            for (offset, &byte) in link.iter().enumerate() {
                let bad = tampered(&links, i, offset, byte ^ 0x01);
                let err = Sigchain::verify(&bad).expect_err("tampered chain verified");
                assert_eq!(
                    err.position,
                    i + 1,
                    "{name}: link {} byte {offset} reported at the wrong link",
                    i + 1
                );
                cases += 1;
            }
        }
        assert!(cases > 100, "{name}: only {cases} cases");
    }
}

proptest! {
    #[test]
    fn any_replacement_byte_anywhere_is_rejected(
        vector in any::<prop::sample::Index>(),
        link in any::<prop::sample::Index>(),
        offset in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let names = good_vector_names();
        let links = good_chain(&names[vector.index(names.len())]);
        let i = link.index(links.len());
        let offset = offset.index(links[i].len());
        prop_assume!(links[i][offset] != byte);
        let bad = tampered(&links, i, offset, byte);
        prop_assert!(Sigchain::verify(&bad).is_err());
    }
}
