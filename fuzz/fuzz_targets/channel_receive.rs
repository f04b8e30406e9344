//! Fuzz target `channel_receive`: see `netcluster::fuzzing::channel_receive`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    netcluster::fuzzing::channel_receive(data);
});
