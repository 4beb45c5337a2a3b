//! `kez_fuzz::webfinger_query` for cargo-fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { kez_fuzz::webfinger_query(data); });
