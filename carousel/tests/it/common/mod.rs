//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod tshark;

use bytes::Bytes;
use carousel::section::{build, LongHeader, TableId};
use carousel::ts::{Depacketizer, Event, Pid, PACKET_LEN};
use carousel::{Class, Emm};

/// A syntactically valid EMM section of `len` bytes (≥ 20) carrying its id.
pub fn emm(id: u64, class: Class, not_after: u64, len: usize) -> Emm {
    let mut body = id.to_be_bytes().to_vec();
    body.resize(len - 12, 0xA5);
    let section = build(&LongHeader::private(TableId::EMM_UNIQUE, id as u16), &body).unwrap();
    Emm {
        id,
        class,
        not_after,
        section: Bytes::from(section),
    }
}

/// The EMM id carried by a section made with [`emm`].
pub fn id_of(section: &[u8]) -> u64 {
    u64::from_be_bytes(section[8..16].try_into().unwrap())
}

/// Demultiplexes a TS byte stream: (EMM sections, CAT sections, errors).
pub fn demux(ts: &[u8], emm_pid: Pid) -> (Vec<Bytes>, Vec<Bytes>, Vec<String>) {
    assert_eq!(ts.len() % PACKET_LEN, 0);
    let mut emm = Depacketizer::new(emm_pid);
    let mut cat = Depacketizer::new(Pid::CAT);
    let (mut e, mut c, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for p in ts.chunks(PACKET_LEN) {
        for (d, out) in [(&mut emm, &mut e), (&mut cat, &mut c)] {
            for ev in d.push(p) {
                match ev {
                    Event::Section(s) => out.push(s),
                    Event::Discontinuity => {}
                    Event::Error(err) => errors.push(format!("PID {}: {err}", d.pid())),
                }
            }
        }
    }
    (e, c, errors)
}
