#![no_main]
//! `wire_control`: see `transfer::fuzzing::wire_control` for what it drives and the invariants it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| transfer::fuzzing::wire_control(data));
