//! Fuzz target `listen_value`: see `netcluster::fuzzing::listen_value`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    netcluster::fuzzing::listen_value(data);
});
