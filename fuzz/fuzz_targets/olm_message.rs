//! `kez_fuzz::olm_message` for cargo-fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { kez_fuzz::olm_message(data); });
