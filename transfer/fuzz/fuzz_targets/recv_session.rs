#![no_main]
//! `recv_session`: see `transfer::fuzzing::recv_session` for what it drives and the invariants it checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| transfer::fuzzing::recv_session(data));
