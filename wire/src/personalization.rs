//! The personalization file (docs/format.md §9): each device's DUK wrapped
//! for the card or set-top-box vendor, never in clear.
//!
//! Scheme: AES key wrap (RFC 3394, AES-128) under a transport key agreed
//! with the vendor (the KTK). The wrapped value is `DUK || u64(device_id)`
//! (24 bytes → 32 bytes), so a line moved to another device fails to
//! unwrap-and-match instead of personalizing a card with a foreign key.
//! Why AES-KW rather than HPKE: personalization systems unwrap in an HSM,
//! and every HSM and `cryptography`/OpenSSL unwrap RFC 3394 natively; its
//! integrity check is built in; and it needs no second key family (the
//! vendor's X25519 key pair) next to the AES-128 hierarchy.

use serde::{Deserialize, Serialize};

use crate::crypto::{key_fingerprint, Key128, KEY_LEN};
use crate::emm::DeviceId;

/// The `format` of the file's header line.
pub const FORMAT: &str = "casd-personalization/1";
/// The `wrap` of the file's header line.
pub const WRAP: &str = "aes128-kw-rfc3394";
/// Bytes of one wrapped value: RFC 3394 adds 8 to the 24 wrapped.
pub const WRAPPED_LEN: usize = KEY_LEN + 8 + 8;

/// The file's first line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: String,
    pub wrap: String,
    /// `exports.id` of the record kept by the headend.
    pub export_id: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// PMK version the DUKs derive from (docs/format.md §2).
    pub pmk_version: u32,
    /// [`key_fingerprint`] of the transport key: which agreed key to use.
    pub transport_key_id: String,
    /// Device lines that follow.
    pub devices: u64,
}

/// One device line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    pub device_id: DeviceId,
    /// Lowercase hex of the [`WRAPPED_LEN`] bytes.
    pub wrapped_duk: String,
}

/// Why a wrapped DUK does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnwrapError {
    #[error("wrapped_duk is not {WRAPPED_LEN} bytes of hex")]
    Malformed,
    #[error("wrapped_duk does not unwrap under this transport key")]
    Integrity,
    #[error("wrapped_duk belongs to device {0}, not to this line's device")]
    OtherDevice(u64),
}

/// The transport key's id in the header.
pub fn transport_key_id(ktk: &Key128) -> String {
    key_fingerprint(ktk)
}

/// `AES-KW(ktk, duk || u64(device_id))`.
pub fn wrap_duk(ktk: &Key128, device_id: DeviceId, duk: &Key128) -> [u8; WRAPPED_LEN] {
    let mut plain = zeroize::Zeroizing::new([0u8; KEY_LEN + 8]);
    plain[..KEY_LEN].copy_from_slice(duk.expose());
    plain[KEY_LEN..].copy_from_slice(&device_id.get().to_be_bytes());
    let mut out = [0u8; WRAPPED_LEN];
    aes_kw::KekAes128::from(*ktk.expose())
        .wrap(&plain[..], &mut out)
        // Only a length that is not a multiple of 8 fails; 24 is.
        .expect("24 bytes always wrap");
    out
}

/// The DUK of `line`, checked against its device id.
pub fn unwrap_duk(ktk: &Key128, line: &Line) -> Result<Key128, UnwrapError> {
    let wrapped = hex::decode(&line.wrapped_duk).map_err(|_| UnwrapError::Malformed)?;
    if wrapped.len() != WRAPPED_LEN {
        return Err(UnwrapError::Malformed);
    }
    let mut plain = zeroize::Zeroizing::new([0u8; KEY_LEN + 8]);
    aes_kw::KekAes128::from(*ktk.expose())
        .unwrap(&wrapped, &mut plain[..])
        .map_err(|_| UnwrapError::Integrity)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&plain[KEY_LEN..]);
    let id = u64::from_be_bytes(id);
    if id != line.device_id.get() {
        return Err(UnwrapError::OtherDevice(id));
    }
    Key128::from_slice(&plain[..KEY_LEN]).map_err(|_| UnwrapError::Malformed)
}

/// The line of one device.
pub fn line(ktk: &Key128, device_id: DeviceId, duk: &Key128) -> Line {
    Line {
        device_id,
        wrapped_duk: hex::encode(wrap_duk(ktk, device_id, duk)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_unwraps_to_its_duk_and_only_for_its_device() {
        let ktk = Key128::from_bytes([7; 16]);
        let duk = Key128::from_bytes([9; 16]);
        let d = DeviceId::new(42).unwrap();
        let l = line(&ktk, d, &duk);
        assert_eq!(unwrap_duk(&ktk, &l).unwrap(), duk);
        let moved = Line {
            device_id: DeviceId::new(43).unwrap(),
            ..l.clone()
        };
        assert_eq!(unwrap_duk(&ktk, &moved), Err(UnwrapError::OtherDevice(42)));
        let other = Key128::from_bytes([8; 16]);
        assert_eq!(unwrap_duk(&other, &l), Err(UnwrapError::Integrity));
    }
}
