//! `kez_fuzz::sent_copy` for cargo-fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { kez_fuzz::sent_copy(data); });
