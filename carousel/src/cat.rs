//! The Conditional Access Table (ISO/IEC 13818-1 §2.4.4.6), PID 0x0001,
//! `table_id` 0x01, carrying one CA_descriptor (§2.6.16) that tells
//! receivers which PID carries the EMMs of a CA_system_ID.
//!
//! Unlike the EMM sections, the CAT has `private_indicator = 0` (13818-1
//! fixes that bit to '0' for the CAT), hence `0xB0` in the second byte where
//! an EMM has `0xF0`. `table_id_extension` is reserved, all ones (0xFFFF).

use crate::section::{self, LongHeader, Section, SectionError, TableId};
use crate::ts::Pid;

/// descriptor_tag of the CA_descriptor.
pub const CA_DESCRIPTOR_TAG: u8 = 0x09;

/// One CA_descriptor: which PID carries the EMMs of which CA system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaDescriptor {
    pub ca_system_id: u16,
    pub ca_pid: Pid,
}

impl CaDescriptor {
    /// descriptor_tag, descriptor_length 4, CA_system_ID, reserved '111' +
    /// CA_PID (no private data bytes).
    pub fn encode(&self) -> [u8; 6] {
        let sys = self.ca_system_id.to_be_bytes();
        let pid = 0xE000 | (self.ca_pid.value() & 0x1FFF);
        let pid = pid.to_be_bytes();
        [CA_DESCRIPTOR_TAG, 4, sys[0], sys[1], pid[0], pid[1]]
    }
}

/// The CAT casd plays: one CA_descriptor, a version number (0..=31).
pub fn build_cat(descriptor: CaDescriptor, version_number: u8) -> Result<Vec<u8>, SectionError> {
    let header = LongHeader {
        table_id: TableId::CAT,
        private_indicator: false,
        table_id_extension: 0xFFFF,
        version_number,
        current_next_indicator: true,
        section_number: 0,
        last_section_number: 0,
    };
    section::build(&header, &descriptor.encode())
}

/// Errors reading a CAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CatError {
    #[error(transparent)]
    Section(#[from] SectionError),
    #[error("table_id {0:#04x} is not a CAT (0x01)")]
    NotCat(u8),
    #[error("descriptor loop truncated at offset {offset}")]
    TruncatedDescriptor { offset: usize },
    #[error("CA_descriptor with length {length}, need at least 4")]
    ShortCaDescriptor { length: u8 },
}

/// A parsed CAT, borrowing the section bytes.
#[derive(Clone, Copy, Debug)]
pub struct Cat<'a> {
    section: Section<'a>,
}

impl<'a> Cat<'a> {
    /// Parses one complete CAT section (CRC checked).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, CatError> {
        let section = Section::parse(bytes)?;
        Self::from_section(section)
    }

    pub fn from_section(section: Section<'a>) -> Result<Self, CatError> {
        if section.table_id() != TableId::CAT {
            return Err(CatError::NotCat(section.table_id().0));
        }
        let cat = Cat { section };
        // Validate the loop once so the iterator can be infallible.
        cat.walk(|_, _| {})?;
        Ok(cat)
    }

    pub fn version_number(&self) -> u8 {
        self.section.version_number()
    }

    /// Every CA_descriptor in the descriptor loop (other tags are skipped).
    pub fn ca_descriptors(&self) -> Vec<CaDescriptor> {
        let mut out = Vec::new();
        let _ = self.walk(|tag, data| {
            if tag == CA_DESCRIPTOR_TAG && data.len() >= 4 {
                out.push(CaDescriptor {
                    ca_system_id: u16::from_be_bytes([data[0], data[1]]),
                    ca_pid: Pid::from_masked(u16::from_be_bytes([data[2], data[3]])),
                });
            }
        });
        out
    }

    fn walk(&self, mut f: impl FnMut(u8, &'a [u8])) -> Result<(), CatError> {
        let body = self.section.body();
        let mut offset = 0;
        while offset < body.len() {
            let (tag, len) = match (body.get(offset), body.get(offset + 1)) {
                (Some(&t), Some(&l)) => (t, l),
                _ => return Err(CatError::TruncatedDescriptor { offset }),
            };
            let data = body
                .get(offset + 2..offset + 2 + usize::from(len))
                .ok_or(CatError::TruncatedDescriptor { offset })?;
            if tag == CA_DESCRIPTOR_TAG && len < 4 {
                return Err(CatError::ShortCaDescriptor { length: len });
            }
            f(tag, data);
            offset += 2 + usize::from(len);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        let cat = build_cat(
            CaDescriptor {
                ca_system_id: 0x4AFF,
                ca_pid: Pid::new(0x0100).unwrap(),
            },
            0,
        )
        .unwrap();
        assert_eq!(
            cat,
            [
                0x01, 0xB0, 0x0F, 0xFF, 0xFF, 0xC1, 0x00, 0x00, 0x09, 0x04, 0x4A, 0xFF, 0xE1, 0x00,
                0xD1, 0xDA, 0xD3, 0xBE
            ]
        );
    }

    #[test]
    fn parse_roundtrip() {
        let d = CaDescriptor {
            ca_system_id: 0x1234,
            ca_pid: Pid::new(0x0101).unwrap(),
        };
        let bytes = build_cat(d, 5).unwrap();
        let cat = Cat::parse(&bytes).unwrap();
        assert_eq!(cat.version_number(), 5);
        assert_eq!(cat.ca_descriptors(), vec![d]);
        assert!(!Section::parse(&bytes).unwrap().private_indicator());
    }

    #[test]
    fn rejects_non_cat_and_bad_loops() {
        let emm = section::build(&LongHeader::private(TableId::EMM_GLOBAL, 0), b"").unwrap();
        assert_eq!(Cat::parse(&emm).unwrap_err(), CatError::NotCat(0x84));
        let header = LongHeader {
            private_indicator: false,
            table_id_extension: 0xFFFF,
            ..LongHeader::private(TableId::CAT, 0)
        };
        let truncated = section::build(&header, &[0x09, 0x04, 0x4A]).unwrap();
        assert_eq!(
            Cat::parse(&truncated).unwrap_err(),
            CatError::TruncatedDescriptor { offset: 0 }
        );
        let short = section::build(&header, &[0x09, 0x02, 0x4A, 0xFF]).unwrap();
        assert_eq!(
            Cat::parse(&short).unwrap_err(),
            CatError::ShortCaDescriptor { length: 2 }
        );
    }
}
