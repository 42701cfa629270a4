#![no_main]
// See mtad::fuzzing::session for what must hold.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mtad::fuzzing::session(data));
