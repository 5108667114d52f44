//! Running Debian's tshark over a capture, for the tests that have
//! Wireshark's dissectors check what we put on air. casd-tools' tests include
//! this file by path, so there is one copy. tshark is required
//! (`apt-get install tshark`; scripts/test.sh installs it): without it the
//! test fails, it is never skipped.

use std::process::Command;

/// tshark's standard output; panics (failing the test) when tshark cannot
/// be run or fails.
pub fn tshark(args: &[&str]) -> String {
    let out = Command::new("tshark")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "tshark is needed by this test and could not be run ({e}): apt-get install tshark"
            )
        });
    assert!(
        out.status.success(),
        "tshark {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every section tshark's MPEG dissectors find in a capture, with its CRC
/// verified.
pub struct Sections {
    /// table_id of each section ("0x82").
    pub tids: Vec<String>,
    /// CRC status of each section ("1" is good).
    pub crc_statuses: Vec<String>,
    /// tshark's own output, for assertion messages.
    pub raw: String,
}

/// The sections in `file`; `decode_as` is extra tshark arguments such as
/// `["-d", "udp.port==5500,mp2t"]` for TS in UDP.
pub fn sections(file: &str, decode_as: &[&str]) -> Sections {
    let args = [
        &["-r", file][..],
        decode_as,
        &[
            "-o",
            "mpeg_sect.verify_crc:TRUE",
            "-T",
            "fields",
            "-E",
            "occurrence=a",
            "-E",
            "separator=;",
            "-e",
            "mpeg_sect.tid",
            "-e",
            "mpeg_sect.crc.status",
        ],
    ]
    .concat();
    // One line per packet: its sections' table_ids, then their CRC statuses.
    let raw = tshark(&args);
    let (mut tids, mut crc_statuses) = (Vec::new(), Vec::new());
    for line in raw.lines() {
        let mut cols = line.split(';');
        let (t, s) = (cols.next().unwrap_or(""), cols.next().unwrap_or(""));
        tids.extend(t.split(',').filter(|x| !x.is_empty()).map(str::to_owned));
        crc_statuses.extend(s.split(',').filter(|x| !x.is_empty()).map(str::to_owned));
    }
    Sections {
        tids,
        crc_statuses,
        raw,
    }
}

/// Asserts that tshark sees no continuity-counter drop in `file`.
pub fn assert_no_cc_drops(file: &str, decode_as: &[&str]) {
    let args = [&["-r", file][..], decode_as, &["-Y", "mp2t.cc.drop"]].concat();
    let drops = tshark(&args);
    assert!(drops.trim().is_empty(), "tshark reports CC drops:\n{drops}");
}
