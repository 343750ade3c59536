//! A peer's document bytes through the Automerge-facing wrapper (load, merge, validate).
//!
//! Automerge 0.12 panics on some inputs; the wrapper contains those panics with
//! `catch_unwind`. libfuzzer-sys's panic hook would abort on them anyway, so it is replaced by
//! a silent one: a panic that escapes the wrapper still reaches libfuzzer-sys's own
//! `catch_unwind` around this target and is reported as a crash.
#![no_main]

static QUIET: std::sync::Once = std::sync::Once::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    trackersync::fuzzing::apply_document(data)
});
