#![no_main]
// See mtad::fuzzing::replies for what must hold.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mtad::fuzzing::replies(data));
