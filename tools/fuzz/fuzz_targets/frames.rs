//! Captured frames of every supported link type → UDP datagram.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    let link = [0u32, 1, 101, 108, 113, 228, 276][usize::from(sel) % 7];
    if let Ok(u) = casd_tools::net::parse_frame(link, frame) {
        assert!(u.payload.len() <= frame.len());
    }
});
