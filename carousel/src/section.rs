//! Long-syntax sections (ISO/IEC 13818-1 §2.4.4.10/§2.4.4.11,
//! `private_section()` with `section_syntax_indicator = 1`).
//!
//! ```text
//! table_id                  8
//! section_syntax_indicator  1   always 1 here (long syntax)
//! private_indicator         1   1 for EMMs, 0 for the CAT
//! reserved                  2   '11'
//! section_length           12   bytes after this field, CRC_32 included
//! table_id_extension       16
//! reserved                  2   '11'
//! version_number            5
//! current_next_indicator    1
//! section_number            8
//! last_section_number       8
//! ... body ...
//! CRC_32                   32   CRC-32/MPEG-2 over table_id .. end of body
//! ```
//!
//! Building is split in two steps on purpose: the EMM builder must compute a
//! MAC over the header and the body *before* the CRC is appended (wire
//! contract §3.3), so it needs the header bytes first:
//!
//! ```
//! use carousel::section::{finish_with_crc, LongHeader, TableId};
//! let body = [0xAA; 20]; // address + envelope + mac, 20 bytes in total
//! let mut buf = LongHeader::private(TableId::EMM_GLOBAL, 0x1234).encode(body.len()).unwrap().to_vec();
//! buf.extend_from_slice(&body);           // (a MAC would be computed over `buf` here)
//! let section = finish_with_crc(buf).unwrap();
//! assert_eq!(section.len(), 8 + 20 + 4);
//! ```
//!
//! [`build`] does both steps when nothing has to be computed in between.

use crate::crc::crc32_mpeg2;

/// The 8 bytes from `table_id` through `last_section_number`.
pub const HEADER_LEN: usize = 8;
/// The CRC_32 trailer.
pub const CRC_LEN: usize = 4;
/// `table_id` + the 16 bits holding `section_length`: the bytes a
/// `section_length` does not count.
pub const LENGTH_PREFIX: usize = 3;
/// Smallest long-syntax section: header + CRC, empty body.
pub const MIN_SECTION_LEN: usize = HEADER_LEN + CRC_LEN;
/// Largest private section (13818-1: `section_length` of a private section
/// shall not exceed 4093, so the whole section is at most 4096 bytes).
pub const MAX_SECTION_LEN: usize = 4096;
/// Largest `section_length` field value of a private section.
pub const MAX_SECTION_LENGTH_FIELD: usize = MAX_SECTION_LEN - LENGTH_PREFIX;
/// Largest body (between header and CRC).
pub const MAX_BODY_LEN: usize = MAX_SECTION_LEN - MIN_SECTION_LEN;

/// A `table_id` value. Constants for the ones casd emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableId(pub u8);

impl TableId {
    /// conditional_access_section (CAT), 13818-1 Table 2-31.
    pub const CAT: TableId = TableId(0x01);
    /// casd unique EMM (addressed to one device).
    pub const EMM_UNIQUE: TableId = TableId(0x82);
    /// casd group EMM (a group of ≤ 256 devices with a slot bitmap).
    pub const EMM_GROUP: TableId = TableId(0x83);
    /// casd global EMM (every device).
    pub const EMM_GLOBAL: TableId = TableId(0x84);
    /// A 0xFF where a `table_id` would start means "stuffing until the end of
    /// this TS packet" (13818-1 §2.4.4), so no section may use it.
    pub const STUFFING: TableId = TableId(0xFF);
}

/// Everything wrong with a section, for the builder and the parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SectionError {
    /// Fewer bytes than the smallest possible section (or than the 3 bytes
    /// needed to read `section_length`).
    #[error("section too short: {len} bytes, need at least {min}")]
    TooShort { len: usize, min: usize },
    /// `section_syntax_indicator` is 0: a short-syntax section has no
    /// header fields and no CRC, casd never uses one.
    #[error("section_syntax_indicator is 0 (short syntax), expected long syntax")]
    NotLongSyntax,
    /// `section_length` above 4093.
    #[error("section_length {section_length} exceeds the private section limit {max}")]
    TooLong { section_length: usize, max: usize },
    /// `section_length` below 9 (5 header bytes after the field + CRC).
    #[error("section_length {section_length} is below the long-syntax minimum 9")]
    LengthTooSmall { section_length: usize },
    /// The buffer does not hold exactly `3 + section_length` bytes.
    #[error("section_length says {declared} bytes in total, buffer has {actual}")]
    LengthMismatch { declared: usize, actual: usize },
    /// The CRC_32 field does not match the bytes before it.
    #[error("CRC_32 mismatch: field holds {stored:#010x}, bytes give {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    /// Builder: the body does not fit in a private section.
    #[error("section body of {body_len} bytes exceeds the maximum {max}")]
    BodyTooLong { body_len: usize, max: usize },
    /// Builder: `version_number` is a 5-bit field.
    #[error("version_number {0} does not fit in 5 bits")]
    VersionOutOfRange(u8),
    /// Builder: 0xFF would be read as stuffing by every demultiplexer.
    #[error("table_id 0xFF is reserved for stuffing")]
    StuffingTableId,
}

/// The header fields of a long-syntax section, for building.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongHeader {
    pub table_id: TableId,
    pub private_indicator: bool,
    pub table_id_extension: u16,
    /// 0..=31.
    pub version_number: u8,
    pub current_next_indicator: bool,
    pub section_number: u8,
    pub last_section_number: u8,
}

impl LongHeader {
    /// The header of a casd EMM (wire contract §3.1): private_indicator 1,
    /// version 0, current_next 1, section 0 of 0.
    pub const fn private(table_id: TableId, table_id_extension: u16) -> Self {
        LongHeader {
            table_id,
            private_indicator: true,
            table_id_extension,
            version_number: 0,
            current_next_indicator: true,
            section_number: 0,
            last_section_number: 0,
        }
    }

    /// The 8 header bytes for a section whose body (everything between the
    /// header and the CRC_32, a MAC included) is `body_len` bytes long.
    /// `section_length` is filled in accordingly (`5 + body_len + 4`).
    pub fn encode(&self, body_len: usize) -> Result<[u8; HEADER_LEN], SectionError> {
        if body_len > MAX_BODY_LEN {
            return Err(SectionError::BodyTooLong {
                body_len,
                max: MAX_BODY_LEN,
            });
        }
        if self.version_number > 31 {
            return Err(SectionError::VersionOutOfRange(self.version_number));
        }
        if self.table_id == TableId::STUFFING {
            return Err(SectionError::StuffingTableId);
        }
        // Fits in 12 bits: checked against MAX_BODY_LEN above.
        let section_length = (HEADER_LEN - LENGTH_PREFIX + body_len + CRC_LEN) as u16;
        let ext = self.table_id_extension.to_be_bytes();
        Ok([
            self.table_id.0,
            // syntax 1, private_indicator, reserved '11', length high nibble
            0x80 | (u8::from(self.private_indicator) << 6) | 0x30 | (section_length >> 8) as u8,
            section_length as u8,
            ext[0],
            ext[1],
            // reserved '11', version_number, current_next_indicator
            0xC0 | (self.version_number << 1) | u8::from(self.current_next_indicator),
            self.section_number,
            self.last_section_number,
        ])
    }

    /// Reads the header fields from the first 8 bytes of `buf`, before
    /// anything else is checked (length, CRC: [`Section::parse`]), so that a
    /// caller can refuse a header field first. Refuses a short-syntax
    /// section, whose fields after `section_length` are not these.
    pub fn decode(buf: &[u8]) -> Result<LongHeader, SectionError> {
        let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
            return Err(SectionError::TooShort {
                len: buf.len(),
                min: HEADER_LEN,
            });
        };
        if h[1] & 0x80 == 0 {
            return Err(SectionError::NotLongSyntax);
        }
        Ok(LongHeader {
            table_id: TableId(h[0]),
            private_indicator: h[1] & 0x40 != 0,
            table_id_extension: u16::from_be_bytes([h[3], h[4]]),
            version_number: (h[5] >> 1) & 0x1F,
            current_next_indicator: h[5] & 0x01 != 0,
            section_number: h[6],
            last_section_number: h[7],
        })
    }
}

/// Appends the CRC_32 to `header + body` produced with
/// [`LongHeader::encode`], after checking that the buffer length agrees with
/// the `section_length` in its header (so a MAC or body of the wrong size is
/// caught here, not by a receiver).
pub fn finish_with_crc(mut buf: Vec<u8>) -> Result<Vec<u8>, SectionError> {
    append_crc(&mut buf, 0)?;
    Ok(buf)
}

/// [`finish_with_crc`] for a section written at the end of a longer buffer
/// (from `start`), so that a builder can write several sections, or one
/// straight into its output, without a copy. On error `buf` is unchanged.
pub fn append_crc(buf: &mut Vec<u8>, start: usize) -> Result<(), SectionError> {
    let section = buf.get(start..).unwrap_or_default();
    let declared = match declared_total_len(section) {
        Some(n) => n,
        None => {
            return Err(SectionError::TooShort {
                len: section.len(),
                min: HEADER_LEN,
            })
        }
    };
    if section.len() < HEADER_LEN || declared != section.len() + CRC_LEN {
        return Err(SectionError::LengthMismatch {
            declared,
            actual: section.len() + CRC_LEN,
        });
    }
    if declared > MAX_SECTION_LEN {
        return Err(SectionError::TooLong {
            section_length: declared - LENGTH_PREFIX,
            max: MAX_SECTION_LENGTH_FIELD,
        });
    }
    let crc = crc32_mpeg2(section);
    buf.extend_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// Header + body + CRC in one go. The result has exactly the capacity it
/// needs, so `bytes::Bytes::from(vec)` does not allocate again.
pub fn build(header: &LongHeader, body: &[u8]) -> Result<Vec<u8>, SectionError> {
    let head = header.encode(body.len())?;
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
    buf.extend_from_slice(&head);
    buf.extend_from_slice(body);
    finish_with_crc(buf)
}

/// `3 + section_length` read from the first 3 bytes, if there are 3 bytes.
pub fn declared_total_len(buf: &[u8]) -> Option<usize> {
    let hi = *buf.get(1)?;
    let lo = *buf.get(2)?;
    Some(LENGTH_PREFIX + ((usize::from(hi & 0x0F) << 8) | usize::from(lo)))
}

/// A validated long-syntax section borrowed from a buffer (zero copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Section<'a> {
    bytes: &'a [u8],
}

impl<'a> Section<'a> {
    /// Parses exactly one section: `buf` must hold `3 + section_length`
    /// bytes and the CRC must match. Never panics.
    pub fn parse(buf: &'a [u8]) -> Result<Self, SectionError> {
        let (section, rest) = Self::parse_prefix(buf)?;
        if !rest.is_empty() {
            return Err(SectionError::LengthMismatch {
                declared: section.bytes.len(),
                actual: buf.len(),
            });
        }
        Ok(section)
    }

    /// Parses the section at the start of `buf` and returns it with the
    /// bytes after it (which may hold more sections or 0xFF stuffing).
    pub fn parse_prefix(buf: &'a [u8]) -> Result<(Self, &'a [u8]), SectionError> {
        let declared = declared_total_len(buf).ok_or(SectionError::TooShort {
            len: buf.len(),
            min: LENGTH_PREFIX,
        })?;
        let flags = buf.get(1).copied().unwrap_or(0);
        if flags & 0x80 == 0 {
            return Err(SectionError::NotLongSyntax);
        }
        let section_length = declared - LENGTH_PREFIX;
        if section_length > MAX_SECTION_LENGTH_FIELD {
            return Err(SectionError::TooLong {
                section_length,
                max: MAX_SECTION_LENGTH_FIELD,
            });
        }
        if declared < MIN_SECTION_LEN {
            return Err(SectionError::LengthTooSmall { section_length });
        }
        let (bytes, rest) = match (buf.get(..declared), buf.get(declared..)) {
            (Some(b), Some(r)) => (b, r),
            _ => {
                return Err(SectionError::LengthMismatch {
                    declared,
                    actual: buf.len(),
                })
            }
        };
        let split = declared - CRC_LEN;
        let (covered, crc_field) = bytes.split_at(split);
        let stored = u32::from_be_bytes([crc_field[0], crc_field[1], crc_field[2], crc_field[3]]);
        let computed = crc32_mpeg2(covered);
        if stored != computed {
            return Err(SectionError::CrcMismatch { stored, computed });
        }
        Ok((Section { bytes }, rest))
    }

    /// The whole section, header and CRC included.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
    pub fn table_id(&self) -> TableId {
        TableId(self.bytes[0])
    }
    pub fn private_indicator(&self) -> bool {
        self.bytes[1] & 0x40 != 0
    }
    /// The 12-bit field: bytes after it, CRC included.
    pub fn section_length(&self) -> usize {
        self.bytes.len() - LENGTH_PREFIX
    }
    pub fn table_id_extension(&self) -> u16 {
        u16::from_be_bytes([self.bytes[3], self.bytes[4]])
    }
    pub fn version_number(&self) -> u8 {
        (self.bytes[5] >> 1) & 0x1F
    }
    pub fn current_next_indicator(&self) -> bool {
        self.bytes[5] & 0x01 != 0
    }
    pub fn section_number(&self) -> u8 {
        self.bytes[6]
    }
    pub fn last_section_number(&self) -> u8 {
        self.bytes[7]
    }
    /// Between the header and the CRC_32 (for an EMM: address, envelope, MAC).
    pub fn body(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..self.bytes.len() - CRC_LEN]
    }
    /// Everything the CRC covers, i.e. all but the last 4 bytes.
    pub fn without_crc(&self) -> &'a [u8] {
        &self.bytes[..self.bytes.len() - CRC_LEN]
    }
    pub fn crc32(&self) -> u32 {
        let n = self.bytes.len();
        u32::from_be_bytes([
            self.bytes[n - 4],
            self.bytes[n - 3],
            self.bytes[n - 2],
            self.bytes[n - 1],
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn emm_header_bits() {
        let h = LongHeader::private(TableId::EMM_UNIQUE, 0xBEEF)
            .encode(20)
            .unwrap();
        // 0xF0: syntax 1, private 1, reserved 11; section_length 5+20+4 = 29.
        assert_eq!(h, [0x82, 0xF0, 29, 0xBE, 0xEF, 0xC1, 0x00, 0x00]);
    }

    #[test]
    fn build_then_parse_roundtrip() {
        let s = build(&LongHeader::private(TableId::EMM_GROUP, 7), b"hello").unwrap();
        assert_eq!(s.len(), s.capacity());
        let p = Section::parse(&s).unwrap();
        assert_eq!(p.table_id(), TableId::EMM_GROUP);
        assert!(p.private_indicator());
        assert_eq!(p.table_id_extension(), 7);
        assert_eq!(p.version_number(), 0);
        assert!(p.current_next_indicator());
        assert_eq!((p.section_number(), p.last_section_number()), (0, 0));
        assert_eq!(p.body(), b"hello");
        assert_eq!(p.section_length(), 5 + 5 + 4);
        assert_eq!(p.crc32(), crc32_mpeg2(p.without_crc()));
    }

    #[test]
    fn finish_with_crc_checks_length() {
        let mut buf = LongHeader::private(TableId::EMM_GLOBAL, 1)
            .encode(10)
            .unwrap()
            .to_vec();
        buf.extend_from_slice(&[0; 9]); // one byte short
        assert_eq!(
            finish_with_crc(buf),
            Err(SectionError::LengthMismatch {
                declared: 22,
                actual: 21
            })
        );
        assert!(matches!(
            finish_with_crc(vec![0x82]),
            Err(SectionError::TooShort { .. })
        ));
    }

    #[test]
    fn header_decode_reads_what_encode_wrote() {
        let h = LongHeader {
            table_id: TableId(0x00),
            private_indicator: false,
            table_id_extension: 0xBEEF,
            version_number: 17,
            current_next_indicator: false,
            section_number: 2,
            last_section_number: 3,
        };
        let bytes = h.encode(20).unwrap();
        assert_eq!(LongHeader::decode(&bytes), Ok(h));
        let emm = LongHeader::private(TableId::EMM_GROUP, 7);
        assert_eq!(LongHeader::decode(&emm.encode(0).unwrap()), Ok(emm));
        assert_eq!(
            LongHeader::decode(&bytes[..7]),
            Err(SectionError::TooShort { len: 7, min: 8 })
        );
        let mut short_syntax = bytes;
        short_syntax[1] &= 0x7F;
        assert_eq!(
            LongHeader::decode(&short_syntax),
            Err(SectionError::NotLongSyntax)
        );
    }

    #[test]
    fn append_crc_after_other_bytes() {
        let body = b"hello";
        let whole = build(&LongHeader::private(TableId::EMM_GLOBAL, 9), body).unwrap();
        let mut buf = vec![0xEE; 5];
        buf.extend_from_slice(&whole[..whole.len() - CRC_LEN]);
        append_crc(&mut buf, 5).unwrap();
        assert_eq!(&buf[..5], &[0xEE; 5]);
        assert_eq!(&buf[5..], &whole[..]);
        // A body one byte short is refused and leaves the buffer as it was.
        let mut short = vec![0xEE; 5];
        short.extend_from_slice(&whole[..whole.len() - CRC_LEN - 1]);
        let before = short.clone();
        assert!(matches!(
            append_crc(&mut short, 5),
            Err(SectionError::LengthMismatch { .. })
        ));
        assert_eq!(short, before);
        assert!(matches!(
            append_crc(&mut short, 100),
            Err(SectionError::TooShort { len: 0, .. })
        ));
    }

    #[test]
    fn builder_limits() {
        let h = LongHeader::private(TableId::EMM_GLOBAL, 0);
        assert!(build(&h, &vec![0; MAX_BODY_LEN]).is_ok());
        assert_eq!(build(&h, &vec![0; MAX_BODY_LEN]).unwrap().len(), 4096);
        assert_eq!(
            build(&h, &vec![0; MAX_BODY_LEN + 1]),
            Err(SectionError::BodyTooLong {
                body_len: 4085,
                max: 4084
            })
        );
        let mut v = h;
        v.version_number = 32;
        assert_eq!(v.encode(0), Err(SectionError::VersionOutOfRange(32)));
        assert_eq!(
            LongHeader::private(TableId::STUFFING, 0).encode(0),
            Err(SectionError::StuffingTableId)
        );
    }

    #[test]
    fn parser_errors_are_precise() {
        let good = build(&LongHeader::private(TableId::EMM_GLOBAL, 0), b"abc").unwrap();
        assert_eq!(
            Section::parse(&good[..2]),
            Err(SectionError::TooShort { len: 2, min: 3 })
        );
        let mut short_syntax = good.clone();
        short_syntax[1] &= 0x7F;
        assert_eq!(
            Section::parse(&short_syntax),
            Err(SectionError::NotLongSyntax)
        );
        assert_eq!(
            Section::parse(&good[..good.len() - 1]),
            Err(SectionError::LengthMismatch {
                declared: good.len(),
                actual: good.len() - 1
            })
        );
        let mut trailing = good.clone();
        trailing.push(0xFF);
        assert!(matches!(
            Section::parse(&trailing),
            Err(SectionError::LengthMismatch { .. })
        ));
        let (_, rest) = Section::parse_prefix(&trailing).unwrap();
        assert_eq!(rest, &[0xFF]);
        let mut bad_crc = good.clone();
        *bad_crc.last_mut().unwrap() ^= 1;
        assert!(matches!(
            Section::parse(&bad_crc),
            Err(SectionError::CrcMismatch { .. })
        ));
        assert_eq!(
            Section::parse(&[0x82, 0xFF, 0xFF]),
            Err(SectionError::TooLong {
                section_length: 4095,
                max: 4093
            })
        );
        assert_eq!(
            Section::parse(&[0x82, 0xF0, 0x05, 0, 0, 0, 0, 0]),
            Err(SectionError::LengthTooSmall { section_length: 5 })
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Section::parse(&data);
            let _ = Section::parse_prefix(&data);
        }

        #[test]
        fn any_body_roundtrips(body in proptest::collection::vec(any::<u8>(), 0..=MAX_BODY_LEN), ext: u16) {
            let s = build(&LongHeader::private(TableId::EMM_UNIQUE, ext), &body).unwrap();
            let p = Section::parse(&s).unwrap();
            prop_assert_eq!(p.body(), &body[..]);
            prop_assert_eq!(p.table_id_extension(), ext);
        }
    }
}
