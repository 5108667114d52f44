//! CRC-32/MPEG-2, the CRC_32 field of every long-syntax section
//! (ISO/IEC 13818-1 Annex A): polynomial 0x04C11DB7, initial value
//! 0xFFFFFFFF, no reflection, no final XOR.

/// The shared CRC engine. `const` so the lookup table is built at compile
/// time; 16-entry slicing because the depacketizer checks every section it
/// reassembles and the cost shows up in the probe's throughput.
pub const CRC32_MPEG2: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_MPEG_2);

/// CRC-32/MPEG-2 of `data`.
pub fn crc32_mpeg2(data: &[u8]) -> u32 {
    CRC32_MPEG2.checksum(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        // The catalogue check value (and the one quoted in the wire contract).
        assert_eq!(crc32_mpeg2(b"123456789"), 0x0376_E6E7);
    }

    #[test]
    fn a_section_including_its_crc_checks_to_zero() {
        // Property of a non-reflected, no-final-xor CRC: running it over the
        // data followed by its own big-endian CRC gives 0. Receivers use it.
        let mut data = b"123456789".to_vec();
        data.extend_from_slice(&crc32_mpeg2(b"123456789").to_be_bytes());
        assert_eq!(crc32_mpeg2(&data), 0);
    }
}
