//! `kez_fuzz::mail_fetch_origins` for cargo-fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { kez_fuzz::mail_fetch_origins(data); });
