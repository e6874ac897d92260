#![no_main]
//! `chunk_tracker`: see `transfer::fuzzing::chunk_tracker` for what it drives and the invariants it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| transfer::fuzzing::chunk_tracker(data));
