//! The committed test vectors of the in-crate modules (`vectors/<dir>/<name>.json`).
//! `make vectors` (KEZ_REGEN_VECTORS=1) rewrites them; otherwise a vector that regeneration
//! would change fails the test.

use std::path::PathBuf;

use serde_json::Value;

/// Checks that `vectors/<dir>/` holds exactly `vectors` (name, rendered JSON), byte for byte,
/// rewriting the directory first under KEZ_REGEN_VECTORS, and returns each name with its
/// committed `expect` member, whose `error` must name the vector's prefix (`bad_name-...`)
/// and which is otherwise for a `good...` vector. `code` picks the error code out of `error`.
pub(crate) fn check(dir: &str, vectors: &[(String, String)], code: fn(&Value) -> &Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("vectors")
        .join(dir);
    if std::env::var_os("KEZ_REGEN_VECTORS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for old in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(old.unwrap().path()).unwrap();
        }
        for (name, rendered) in vectors {
            std::fs::write(dir.join(format!("{name}.json")), rendered).unwrap();
        }
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        vectors.len(),
        "run `make vectors`"
    );
    for (name, rendered) in vectors {
        let path = dir.join(format!("{name}.json"));
        let committed = std::fs::read_to_string(&path).unwrap();
        assert!(
            committed == *rendered,
            "{} is stale; run `make vectors`",
            path.display()
        );
        let parsed: Value = serde_json::from_str(&committed).unwrap();
        let expected = name.split('-').next().unwrap();
        match parsed["expect"].get("error") {
            Some(error) => assert_eq!(code(error), expected, "{name}"),
            None => assert_eq!(expected, "good", "{name}"),
        }
    }
}
