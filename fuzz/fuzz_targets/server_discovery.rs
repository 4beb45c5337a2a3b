//! `kez_fuzz::server_discovery` for cargo-fuzz.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { kez_fuzz::server_discovery(data); });
