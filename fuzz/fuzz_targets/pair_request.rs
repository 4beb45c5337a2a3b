//! `kez_fuzz::pair_request` for cargo-fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { kez_fuzz::pair_request(data); });
