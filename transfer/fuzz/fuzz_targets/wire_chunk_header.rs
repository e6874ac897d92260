#![no_main]
//! `wire_chunk_header`: see `transfer::fuzzing::wire_chunk_header` for what it drives and the invariants it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| transfer::fuzzing::wire_chunk_header(data));
