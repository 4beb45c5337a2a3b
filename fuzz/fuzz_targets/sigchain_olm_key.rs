//! `kez_fuzz::sigchain_olm_key` for cargo-fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { kez_fuzz::sigchain_olm_key(data); });
