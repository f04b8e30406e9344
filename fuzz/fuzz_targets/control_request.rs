//! Fuzz target `control_request`: see `netcluster::fuzzing::control_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    netcluster::fuzzing::control_request(data);
});
