//! `kez_fuzz::envelope_v2` for cargo-fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { kez_fuzz::envelope_v2(data); });
