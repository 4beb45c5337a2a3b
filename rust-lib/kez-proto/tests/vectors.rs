//! The signed request vectors of PROTOCOL.md §5.2 (registration) and §10 (pinning), committed
//! beside kez-core's under `rust-lib/kez-core/vectors/` (one directory of vectors for other
//! implementations) and checked both ways: regenerating reproduces each file byte for byte, and
//! the committed request verifies. `make vectors` rewrites them (KEZ_REGEN_VECTORS=1).

use std::path::PathBuf;

use kez_core::SecretKey;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// 2026-01-01T00:00:00Z: the time every request is made at.
const T0: u64 = 1_767_225_600;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kez-core/vectors")
}

/// The seed of a named test key: SHA-256 of `kez test vector key: <name>` (as kez-core's vectors).
fn seed(name: &str) -> [u8; 32] {
    Sha256::digest(format!("kez test vector key: {name}")).into()
}

fn secret(name: &str) -> SecretKey {
    SecretKey::from_seed(&seed(name))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The registration request of PROTOCOL.md §5.2: alice registers `alice` on `kez.lat` at T0.
fn registration_vector() -> String {
    use kez_proto::registry::RegistrationRequest;
    let handle = kez_core::Handle::parse("alice", "kez.lat").unwrap();
    let request = RegistrationRequest::sign(&secret("alice"), &handle, T0);
    let vector = json!({
        "description": "alice registers alice on kez.lat at 1767225600; verify with domain kez.lat and a clock within 300 s",
        "key_seed": hex(&seed("alice")),
        "signed_message_hex": hex(&request.signed_message()),
        "request": String::from_utf8(serde_json::to_vec(&request).unwrap()).unwrap(),
    });
    serde_json::to_string_pretty(&vector).unwrap() + "\n"
}

/// The vector committed at `path`, rewritten with `generated` first under KEZ_REGEN_VECTORS (`make
/// vectors`); fails unless `generated` reproduces it byte for byte.
fn committed_vector(path: &std::path::Path, generated: String) -> String {
    if std::env::var_os("KEZ_REGEN_VECTORS").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap();
    assert!(
        committed == generated,
        "{} differs; run `make vectors`",
        path.display()
    );
    committed
}

#[test]
fn registration_vector_is_reproduced_and_verifies() {
    use kez_proto::registry::RegistrationRequest;
    let committed = committed_vector(
        &vectors_dir().join("registration.json"),
        registration_vector(),
    );
    let vector: Value = serde_json::from_str(&committed).unwrap();
    let request: RegistrationRequest =
        serde_json::from_str(vector["request"].as_str().unwrap()).unwrap();
    assert_eq!(hex(&request.signed_message()), vector["signed_message_hex"]);
    let handle = request.verify("kez.lat", T0 + 299).unwrap();
    assert_eq!(handle.to_string(), "@alice@kez.lat");
}

/// The pin request of PROTOCOL.md §10: alice asks kez.lat at T0 to pin the §9.3 example blob.
fn pin_vector() -> String {
    use kez_core::file::BlobHash;
    use kez_proto::pin::PinRequest;
    let blob: BlobHash = "f3f93ee2f224d8944a8b4dad7e1be292b03f4df49f3f133a49acb11a46819e26"
        .parse()
        .unwrap();
    let provider =
        "iroh:ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6;ip=192.0.2.7:4433";
    let request = PinRequest::add(
        &secret("alice"),
        "kez.lat",
        T0,
        blob,
        45,
        vec![provider.into()],
    );
    let vector = json!({
        "description": "alice asks kez.lat at 1767225600 to pin a 45-byte blob; verify as kez.pin.add with domain kez.lat and a clock within 300 s",
        "key_seed": hex(&seed("alice")),
        "signed_message_hex": hex(&request.signed_message()),
        "request": String::from_utf8(serde_json::to_vec(&request).unwrap()).unwrap(),
    });
    serde_json::to_string_pretty(&vector).unwrap() + "\n"
}

#[test]
fn pin_vector_is_reproduced_and_verifies() {
    use kez_proto::pin::{PinOp, PinRequest};
    let committed = committed_vector(&vectors_dir().join("pin.json"), pin_vector());
    let vector: Value = serde_json::from_str(&committed).unwrap();
    let request: PinRequest = serde_json::from_str(vector["request"].as_str().unwrap()).unwrap();
    assert_eq!(hex(&request.signed_message()), vector["signed_message_hex"]);
    request.verify(PinOp::Add, "kez.lat", T0 + 299).unwrap();
    assert!(request.verify(PinOp::Add, "kez.lat", T0 + 301).is_err());
}
