//! `kez_fuzz::server_keys_count` for cargo-fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { kez_fuzz::server_keys_count(data); });
