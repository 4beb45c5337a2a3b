//! kez-chat's fuzz targets as plain functions, one per parser or decoder that takes bytes from
//! the network or from another user.
//!
//! Each target takes any `&[u8]`, must never panic, and asserts the invariants of what it
//! parses: a parsed value re-encodes to the bytes it came from, an accepted link or chain
//! verifies again to the same state, an opened envelope names us and its verified sender, and
//! so on. A failed assertion is a bug in the code under test (or in the invariant). Each returns
//! whether the input was accepted, so tests can check that seeds reach the success paths.
//!
//! No target allocates in proportion to a length claimed inside its input: lengths are taken
//! from the input's real size, or capped by a constant (see each target).
//!
//! `fuzz/` wraps each target for cargo-fuzz (`make soak`); `tests/regressions.rs` runs every
//! file under `regressions/<target>/` through its target in `make test`, on stable Rust.

mod core_targets;
mod jwt;
pub mod seeds;
mod server;

pub use core_targets::{
    PAIR_NOW, chat, envelope, envelope_v2, file_decrypt, file_key, file_offer, handle, manifest,
    olm_message, pair_request, provider, public_key, sent_copy, sigchain, sigchain_olm_key,
};
pub use jwt::callout_jwt;
pub use server::{
    mail_fetch_answer, mail_fetch_origins, server_append, server_discovery, server_get,
    server_head, server_info, server_keys_claim, server_keys_count, server_keys_publish,
    server_lookup, server_mail_deliver, server_mail_fetch, server_mail_relay, server_mail_send,
    server_pair, server_pin, server_register, server_whois, webfinger_query,
};

/// A fuzz target: any bytes in, `true` if the input was accepted; panics only on a bug.
pub type Target = fn(&[u8]) -> bool;

/// Every target by name: the name of its `fuzz/fuzz_targets/<name>.rs` and of its
/// `regressions/<name>/` directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("sigchain", sigchain),
    ("envelope", envelope),
    ("sent_copy", sent_copy),
    ("chat", chat),
    ("pair_request", pair_request),
    ("file_decrypt", file_decrypt),
    ("file_offer", file_offer),
    ("manifest", manifest),
    ("file_key", file_key),
    ("handle", handle),
    ("public_key", public_key),
    ("provider", provider),
    ("callout_jwt", callout_jwt),
    ("server_register", server_register),
    ("server_lookup", server_lookup),
    ("server_whois", server_whois),
    ("server_append", server_append),
    ("server_head", server_head),
    ("server_get", server_get),
    ("server_info", server_info),
    ("server_mail_send", server_mail_send),
    ("server_mail_fetch", server_mail_fetch),
    ("mail_fetch_answer", mail_fetch_answer),
    ("mail_fetch_origins", mail_fetch_origins),
    ("server_mail_relay", server_mail_relay),
    ("server_mail_deliver", server_mail_deliver),
    ("server_discovery", server_discovery),
    ("server_pin", server_pin),
    ("server_pair", server_pair),
    ("server_keys_publish", server_keys_publish),
    ("server_keys_count", server_keys_count),
    ("server_keys_claim", server_keys_claim),
    ("webfinger_query", webfinger_query),
    ("envelope_v2", envelope_v2),
    ("olm_message", olm_message),
    ("sigchain_olm_key", sigchain_olm_key),
];

/// The target named `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, target)| *target)
}

/// Test keys: the seeds of `alice` and `bob` in `rust-lib/kez-core/vectors` (public test data,
/// never a real identity).
pub mod keys {
    use kez_core::SecretKey;

    /// alice's seed (the vectors' sender and chain owner).
    pub const ALICE_SEED: [u8; 32] =
        hex32("79dab71a5e025984984a287c6a28e6ccfe1ebb97c841a24c861017897c1d733e");
    /// bob's seed (the vectors' envelope recipient).
    pub const BOB_SEED: [u8; 32] =
        hex32("601c45fe2d54aff57ab2abc2a563341bafba0525a19d1e6dd5daadb6f883ddb9");

    /// alice's key.
    pub fn alice() -> SecretKey {
        SecretKey::from_seed(&ALICE_SEED)
    }

    /// bob's key.
    pub fn bob() -> SecretKey {
        SecretKey::from_seed(&BOB_SEED)
    }

    const fn hex32(text: &str) -> [u8; 32] {
        let bytes = text.as_bytes();
        let mut out = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            out[i] = nibble(bytes[2 * i]) << 4 | nibble(bytes[2 * i + 1]);
            i += 1;
        }
        out
    }

    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not lowercase hex"),
        }
    }
}

/// Splits `data` at its first byte: `(mode, rest)`, `(0, [])` for empty input.
fn mode(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((mode, rest)) => (*mode, rest),
        None => (0, data),
    }
}
