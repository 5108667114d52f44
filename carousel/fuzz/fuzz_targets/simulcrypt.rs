#![no_main]
//! The SimulCrypt EMMG⇔MUX message parser on arbitrary bytes (what a MUX,
//! or an EMMG talking to the simulator, may send): parsing must never
//! panic, and a message that parses encodes to bytes that parse back to the
//! same message.

use carousel::simulcrypt::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let version = data.first().copied().unwrap_or(2);
    if let Ok(m) = Message::parse(data, version) {
        let mut again = Vec::new();
        m.encode(version, &mut again)
            .expect("a parsed message fits its lengths");
        assert_eq!(Message::parse(&again, version).as_ref(), Ok(&m));
    }
});
