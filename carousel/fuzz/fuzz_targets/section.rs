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
            // Reserved bits may differ; everything else must match.
            assert_eq!(again.len(), data.len());
            assert_eq!(&again[3..], &data[3..]);
        }
    }
    let _ = Section::parse_prefix(data);
    if let Ok(cat) = Cat::parse(data) {
        let _ = cat.ca_descriptors();
    }
});
