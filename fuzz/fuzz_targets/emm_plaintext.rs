#![no_main]
//! The EMM plaintext (docs/format.md §3.4) on arbitrary bytes: decoding
//! must never panic, and a plaintext that decodes must encode back to the
//! same bytes.

use casd_wire::emm::EmmPlaintext;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = EmmPlaintext::decode(data) {
        if let Ok(bytes) = p.encode() {
            assert_eq!(&bytes[..], data, "decode then encode changed the bytes");
        }
    }
});
