//! Fuzz target `decode_frames`: see `netcluster::fuzzing::decode_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    netcluster::fuzzing::decode_frames(data);
});
