//! Arbitrary bytes from a device after its CONNECT: framing, then every body parser the edge
//! applies, and the re-encodings it sends to the engine. Any panic is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    telemon_broker::edge::packet::exercise(data);
});
