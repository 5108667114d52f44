#![no_main]
//! SMS command bodies (sms-api.md) on arbitrary bytes, for each of the five
//! commands: parsing must never panic; a body that parses gives a command
//! whose canonical form is stable (parsing the same bytes again gives the
//! same idempotency digest) and whose transaction_id is within the spec's
//! bounds.

use casd::sms::types::parse_command;
use casd::sms::CommandKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let kind = CommandKind::ALL[usize::from(which) % CommandKind::ALL.len()];
    // The largest section the carousel takes, and a small one (an OSM's
    // text must fit it).
    let max_section = if which & 0x80 == 0 { 4096 } else { 256 };
    if let Ok(req) = parse_command(kind, body, max_section) {
        let again = parse_command(kind, body, max_section).expect("parses twice");
        assert_eq!(req.canonical_sha256(), again.canonical_sha256());
        let tid = req.transaction_id.as_str();
        assert!(!tid.is_empty() && tid.len() <= 64, "transaction_id {tid:?}");
    }
});
