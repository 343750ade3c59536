//! Peer frames: protobuf decode of every message and the validating conversions.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| trackersync::fuzzing::wire_decode(data));
