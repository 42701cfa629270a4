#![no_main]
// See mtad::fuzzing::config for what must hold.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mtad::fuzzing::config(data));
