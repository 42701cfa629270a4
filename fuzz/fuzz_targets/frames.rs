#![no_main]
// See mtad::fuzzing::frames for what must hold.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mtad::fuzzing::frames(data));
