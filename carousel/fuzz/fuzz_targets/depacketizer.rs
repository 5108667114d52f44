#![no_main]
//! The depacketizer on arbitrary packet streams: must never panic, and every
//! section it returns must pass the section parser (CRC included).

use carousel::section::Section;
use carousel::ts::{Depacketizer, Event, Pid, PACKET_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pid_byte, rest)) = data.split_first() else {
        return;
    };
    let mut d = Depacketizer::new(Pid::from_masked(u16::from(pid_byte & 0x03)));
    for chunk in rest.chunks(PACKET_LEN) {
        d.push_with(chunk, |e| {
            if let Event::Section(s) = e {
                assert!(Section::parse(&s).is_ok());
            }
        });
    }
});
