#![no_main]
//! `manifest_builder`: see `transfer::fuzzing::manifest_builder` for what it drives and the invariants it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| transfer::fuzzing::manifest_builder(data));
