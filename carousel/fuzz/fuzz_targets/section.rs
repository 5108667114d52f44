#![no_main]
//! Section and CAT parsers on arbitrary bytes: must never panic, and a
//! section that parses must re-serialise to the same bytes.

use carousel::cat::Cat;
use carousel::section::{build, LongHeader, Section};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Section::parse(data) {
        let header = LongHeader {
            table_id: s.table_id(),
            private_indicator: s.private_indicator(),
            table_id_extension: s.table_id_extension(),
            version_number: s.version_number(),
            current_next_indicator: s.current_next_indicator(),
            section_number: s.section_number(),
            last_section_number: s.last_section_number(),
        };
        if let Ok(again) = build(&header, s.body()) {
            // Reserved bits may differ (the parser ignores them, as
            // 13818-1 asks; the builder writes them as 1): in byte 1 and
            // the top two bits of byte 5, and then the CRC with them.
            // Everything else must match.
            assert_eq!(again.len(), data.len());
            let n = data.len();
            assert_eq!(&again[3..5], &data[3..5]);
            assert_eq!(again[5] & 0x3f, data[5] & 0x3f);
            assert_eq!(&again[6..n - 4], &data[6..n - 4]);
            if data[1] & 0x30 == 0x30 && data[5] & 0xc0 == 0xc0 {
                assert_eq!(&again[n - 4..], &data[n - 4..]);
            }
        }
    }
    let _ = Section::parse_prefix(data);
    if let Ok(cat) = Cat::parse(data) {
        let _ = cat.ca_descriptors();
    }
});
