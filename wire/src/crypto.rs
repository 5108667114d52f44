//! Key types, the SP 800-108 CMAC KDF and the section envelope of
//! `docs/format.md` §2–§4 (seal and open). Pure: no I/O, no clock; random
//! bytes come from the CSPRNG the caller passes in.
//!
//! Layout of a sealed section (all integers big-endian):
//!
//! ```text
//! header(8) | address(0/8/36) | 0x01 | key_version u32 | iv(16) | wrapped_dek(16)
//!           | ciphertext(n) | mac(16) | crc32(4)
//! ```
//!
//! `mac = AES-CMAC(K_mac, table_id .. end of ciphertext)`,
//! `crc32 = CRC-32/MPEG-2(table_id .. end of mac)`,
//! `K_wrap || K_mac = KDF(address_root, "CAS-EMM-KEK", table_id || address, 256)`.
//!
//! The header and the CRC are written and read by the carousel's section
//! codec (`carousel::section`: [`LongHeader`], [`Section`]); this module adds
//! the address, the envelope and the MAC between them.
//!
//! No function here prints, logs or returns key bytes in an error.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit, KeyIvInit, StreamCipher};
use aes::{Aes128Dec, Aes128Enc};
use carousel::section::{self, LongHeader, Section, SectionError, TableId};
use cmac::{Cmac, Mac};
use rand::{CryptoRng, RngCore};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// AES-128-CTR with the whole 128-bit block as a big-endian counter (§3.3).
type Aes128Ctr = ctr::Ctr128BE<Aes128Enc>;
/// AES-128-CMAC (encryption-only key schedule: CMAC never decrypts).
type Aes128Cmac = Cmac<Aes128Enc>;

/// Length of every key in the hierarchy.
pub const KEY_LEN: usize = 16;
/// table_id of a unique (one device) EMM.
pub const TABLE_ID_UNIQUE: u8 = 0x82;
/// table_id of a group EMM.
pub const TABLE_ID_GROUP: u8 = 0x83;
/// table_id of a global EMM.
pub const TABLE_ID_GLOBAL: u8 = 0x84;
/// table_id of key material sealed at rest (§4); never on air.
pub const TABLE_ID_AT_REST: u8 = 0x00;
/// The only envelope format_version this code writes and reads.
pub const FORMAT_VERSION: u8 = 0x01;
/// KDF label of the device unique key.
pub const LABEL_DUK: &[u8] = b"CAS-DUK";
/// KDF label of the per-address wrap/MAC keys.
pub const LABEL_EMM_KEK: &[u8] = b"CAS-EMM-KEK";
/// Long-syntax section header length.
pub const HEADER_LEN: usize = section::HEADER_LEN;
/// format_version + key_version + iv + wrapped_dek.
pub const ENVELOPE_PREFIX_LEN: usize = 1 + 4 + 16 + 16;
/// AES-CMAC tag length.
pub const MAC_LEN: usize = 16;
/// CRC-32/MPEG-2 length.
pub const CRC_LEN: usize = section::CRC_LEN;
/// Bytes of a section that are not address nor ciphertext (65).
pub const SECTION_OVERHEAD: usize = HEADER_LEN + ENVELOPE_PREFIX_LEN + MAC_LEN + CRC_LEN;
/// Default `max_section_bytes` (§3.3: the common receiver buffer).
pub const DEFAULT_MAX_SECTION_BYTES: usize = 256;
/// Upper bound of `max_section_bytes` (a private section is at most 4096 bytes).
pub const MAX_SECTION_BYTES_LIMIT: usize = section::MAX_SECTION_LEN;
/// Length of a key sealed at rest (§4 and `docs/format.md`): 8 + 8 + 37 + 16 + 16 + 4.
pub const AT_REST_BLOB_LEN: usize = SECTION_OVERHEAD + 8 + KEY_LEN;

/// CRC-32/MPEG-2 of `bytes`: the carousel crate's one CRC engine.
pub use carousel::crc::crc32_mpeg2;

/// Address (§3.2) of a unique EMM: device_id u64.
pub const ADDRESS_LEN_UNIQUE: usize = 8;
/// Address of a group EMM: group_id u32 + 256-slot bitmap.
pub const ADDRESS_LEN_GROUP: usize = 4 + 32;
/// A global EMM has no address.
pub const ADDRESS_LEN_GLOBAL: usize = 0;
/// Address of a key sealed at rest: the row id u64.
pub const ADDRESS_LEN_AT_REST: usize = 8;

/// Length of the address (§3.2) that follows the header for `table_id`, or
/// `None` when casd does not use that table_id.
pub const fn address_len(table_id: u8) -> Option<usize> {
    match table_id {
        TABLE_ID_UNIQUE => Some(ADDRESS_LEN_UNIQUE),
        TABLE_ID_GROUP => Some(ADDRESS_LEN_GROUP),
        TABLE_ID_GLOBAL => Some(ADDRESS_LEN_GLOBAL),
        TABLE_ID_AT_REST => Some(ADDRESS_LEN_AT_REST),
        _ => None,
    }
}

/// Longest address of any table_id.
const MAX_ADDRESS_LEN: usize = ADDRESS_LEN_GROUP;

// ---------------------------------------------------------------------------
// Key128
// ---------------------------------------------------------------------------

/// A 128-bit AES key (PMK, DUK, GK, GLK, root key, DEK, K_wrap, K_mac).
///
/// Zeroized on drop; `Debug` prints `Key128(<redacted>)`; no `Display`, no
/// serde; `==` runs in constant time. Read the bytes only through
/// [`Key128::expose`].
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key128([u8; KEY_LEN]);

impl Key128 {
    /// Wraps key bytes. The caller should zeroize its own copy.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Key128(bytes)
    }

    /// Copies a 16-byte slice; any other length is refused.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyLengthError> {
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| KeyLengthError { got: bytes.len() })?;
        Ok(Key128(arr))
    }

    /// 16 fresh bytes from a CSPRNG.
    pub fn random<R: RngCore + CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut k = Key128([0u8; KEY_LEN]);
        rng.fill_bytes(&mut k.0);
        k
    }

    /// The raw key bytes. Every call site is a place where key material is
    /// handled: keep them few and never log the result.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl From<zeroize::Zeroizing<[u8; KEY_LEN]>> for Key128 {
    fn from(z: zeroize::Zeroizing<[u8; KEY_LEN]>) -> Self {
        Key128(*z)
    }
}

impl core::fmt::Debug for Key128 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Key128(<redacted>)")
    }
}

impl ConstantTimeEq for Key128 {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for Key128 {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for Key128 {}

/// A key of the wrong length was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a key is 16 bytes, got {got}")]
pub struct KeyLengthError {
    /// The length that was given.
    pub got: usize,
}

// ---------------------------------------------------------------------------
// KDF
// ---------------------------------------------------------------------------

/// The KDF output is longer than SP 800-108 allows with a 32-bit L.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KDF output of {bytes} bytes is too long")]
pub struct KdfLengthError {
    /// Requested output length in bytes.
    pub bytes: usize,
}

/// NIST SP 800-108 KDF in counter mode with AES-128-CMAC as PRF, 32-bit
/// counter before the fixed data, fixed data `label || 0x00 || context ||
/// u32(L)`, L = `out.len() * 8` bits. Fills `out` with the first L bits of
/// `K(1) || K(2) || …`.
pub fn kdf_ctr_cmac(
    key: &Key128,
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Result<(), KdfLengthError> {
    let l_bits = u32::try_from(out.len())
        .ok()
        .and_then(|n| n.checked_mul(8))
        .ok_or(KdfLengthError { bytes: out.len() })?;
    let prf = <Aes128Cmac as KeyInit>::new(GenericArray::from_slice(key.expose()));
    kdf_with_prf(&prf, label, context, l_bits, out);
    Ok(())
}

/// SP 800-108 counter mode with AES-128-CMAC and a 32-bit counter before
/// caller-assembled fixed input data: `K(i) = CMAC(key, u32(i) || fixed)`.
/// This is the form NIST's CAVP KBKDF vectors use; [`kdf_ctr_cmac`] is this
/// with `fixed = label || 0x00 || context || u32(L)`.
pub fn kdf_ctr_cmac_fixed(
    key: &Key128,
    fixed: &[u8],
    out: &mut [u8],
) -> Result<(), KdfLengthError> {
    if out.len() > (u32::MAX as usize) / 8 {
        return Err(KdfLengthError { bytes: out.len() });
    }
    let prf = <Aes128Cmac as KeyInit>::new(GenericArray::from_slice(key.expose()));
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        let mut m = prf.clone();
        m.update(&(i as u32 + 1).to_be_bytes());
        m.update(fixed);
        let block = Zeroizing::new(<[u8; 16]>::from(m.finalize().into_bytes()));
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
    Ok(())
}

/// Core of the KDF with an already keyed PRF (the key schedule is done once).
fn kdf_with_prf(prf: &Aes128Cmac, label: &[u8], context: &[u8], l_bits: u32, out: &mut [u8]) {
    // Short inputs (all of casd's) are assembled once on the stack and fed to
    // CMAC in one update; long ones are streamed.
    const STACK: usize = 96;
    let fixed_len = label.len() + 1 + context.len() + 4;
    let mut buf = [0u8; STACK];
    let on_stack = 4 + fixed_len <= STACK;
    if on_stack {
        buf[4..4 + label.len()].copy_from_slice(label);
        let c = 4 + label.len() + 1;
        buf[c..c + context.len()].copy_from_slice(context);
        buf[c + context.len()..4 + fixed_len].copy_from_slice(&l_bits.to_be_bytes());
    }
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        let mut m = prf.clone();
        // i < out.len()/16 + 1 <= u32::MAX / 8, so the counter never wraps.
        let counter = (i as u32 + 1).to_be_bytes();
        if on_stack {
            buf[..4].copy_from_slice(&counter);
            m.update(&buf[..4 + fixed_len]);
        } else {
            m.update(&counter);
            m.update(label);
            m.update(&[0x00]);
            m.update(context);
            m.update(&l_bits.to_be_bytes());
        }
        let block = Zeroizing::new(<[u8; 16]>::from(m.finalize().into_bytes()));
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

/// `DUK(device) = KDF(PMK_v, "CAS-DUK", device_id as u64, L = 128)` (§2).
pub fn derive_duk(pmk: &Key128, device_id: u64) -> Key128 {
    let mut out = Key128([0u8; KEY_LEN]);
    let prf = <Aes128Cmac as KeyInit>::new(GenericArray::from_slice(pmk.expose()));
    kdf_with_prf(&prf, LABEL_DUK, &device_id.to_be_bytes(), 128, &mut out.0);
    out
}

/// `K_wrap || K_mac = KDF(address_root, "CAS-EMM-KEK", table_id || address, L = 256)` (§2).
pub fn derive_emm_keys(address_root: &Key128, table_id: u8, address: &[u8]) -> (Key128, Key128) {
    let okm = derive_emm_okm(address_root, table_id, address);
    (key_from_okm(&okm, 0), key_from_okm(&okm, 16))
}

/// The 16 bytes of `okm` from `offset` (0 for K_wrap, 16 for K_mac).
fn key_from_okm(okm: &[u8; 32], offset: usize) -> Key128 {
    let mut k = Key128([0u8; KEY_LEN]);
    k.0.copy_from_slice(&okm[offset..offset + KEY_LEN]);
    k
}

fn derive_emm_okm(address_root: &Key128, table_id: u8, address: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut context = [0u8; 1 + MAX_ADDRESS_LEN];
    context[0] = table_id;
    // Callers validate the address length; clamp defensively instead of panicking.
    let n = address.len().min(MAX_ADDRESS_LEN);
    context[1..1 + n].copy_from_slice(&address[..n]);
    let mut okm = Zeroizing::new([0u8; 32]);
    let prf = <Aes128Cmac as KeyInit>::new(GenericArray::from_slice(address_root.expose()));
    kdf_with_prf(&prf, LABEL_EMM_KEK, &context[..1 + n], 256, &mut okm[..]);
    okm
}

/// KDF label of key fingerprints.
pub const LABEL_FINGERPRINT: &[u8] = b"CAS-KEY-FINGERPRINT";

/// A public, one-way identifier of a key (e.g. to check that the root key
/// in the key file is the one that sealed the `keys` rows): 16 lowercase hex
/// digits of `KDF(key, "CAS-KEY-FINGERPRINT", empty context, L = 64)`.
pub fn key_fingerprint(key: &Key128) -> String {
    let mut out = [0u8; 8];
    let prf = <Aes128Cmac as KeyInit>::new(GenericArray::from_slice(key.expose()));
    kdf_with_prf(&prf, LABEL_FINGERPRINT, &[], 64, &mut out);
    hex::encode(out)
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a section could not be sealed. Nothing is ever truncated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// `max_section_bytes` is above 4096.
    #[error("max_section_bytes {0} is above the limit of {MAX_SECTION_BYTES_LIMIT}")]
    MaxSectionBytesOutOfRange(usize),
    /// The sealed section would not fit.
    #[error("the sealed section would be {size} bytes, over max_section_bytes {max} (plaintext {plaintext} bytes)")]
    TooLarge {
        /// Size the section would have.
        size: usize,
        /// The configured limit.
        max: usize,
        /// The plaintext length that caused it.
        plaintext: usize,
    },
    /// The table_id is not one of 0x82/0x83/0x84/0x00.
    #[error("table_id {0:#04x} is not one casd seals")]
    UnknownTableId(u8),
    /// The address has the wrong length for the table_id.
    #[error("an address for table_id {table_id:#04x} is {expected} bytes, got {got}")]
    AddressLength {
        /// table_id asked for.
        table_id: u8,
        /// Length §3.2 fixes for it.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// The section codec refused the header or length (cannot happen once
    /// the size and table_id checks above passed; typed rather than unwrapped).
    #[error("section: {0}")]
    Section(#[from] SectionError),
    /// The plaintext writer did not write the length it announced (a bug in the caller).
    #[error("plaintext writer produced {got} bytes, announced {announced}")]
    PlaintextLengthMismatch {
        /// Announced length.
        announced: usize,
        /// Written length.
        got: usize,
    },
}

/// Why a section (or an at-rest blob) was refused. No byte of a refused
/// section is ever returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Shorter than the smallest possible section for its table_id.
    #[error("section of {len} bytes is too short")]
    Truncated {
        /// Length given.
        len: usize,
    },
    /// table_id not one of 0x82/0x83/0x84 (or 0x00 at rest).
    #[error("table_id {0:#04x} is not a casd EMM table")]
    UnknownTableId(u8),
    /// section_syntax_indicator, private_indicator, section_number or
    /// last_section_number is not what §3.1 fixes.
    #[error("section header field {0} has a value §3.1 does not allow")]
    BadHeader(&'static str),
    /// section_length disagrees with the number of bytes.
    #[error("section_length says {declared} bytes follow, {actual} do")]
    LengthMismatch {
        /// From section_length.
        declared: usize,
        /// Actually present after the section_length field.
        actual: usize,
    },
    /// CRC-32/MPEG-2 mismatch.
    #[error("CRC mismatch: computed {computed:#010x}, section has {stored:#010x}")]
    Crc {
        /// CRC over table_id .. end of mac.
        computed: u32,
        /// The last 4 bytes.
        stored: u32,
    },
    /// format_version is not 0x01.
    #[error("envelope format_version {0:#04x} is not supported (only 0x01)")]
    UnsupportedFormatVersion(u8),
    /// AES-CMAC mismatch: wrong key, or the section was altered.
    #[error("MAC check failed (wrong key or altered section)")]
    Mac,
    /// The at-rest blob is authentic but belongs to another row.
    #[error("sealed key belongs to row {found}, not row {expected}")]
    RowMismatch {
        /// Row the caller asked for.
        expected: u64,
        /// Row the blob was sealed for.
        found: u64,
    },
    /// The at-rest blob's plaintext is not a 16-byte key.
    #[error("sealed key plaintext is {0} bytes, not 16")]
    KeyLength(usize),
}

// ---------------------------------------------------------------------------
// Section keys and sealing
// ---------------------------------------------------------------------------

/// The expanded K_wrap / K_mac of one (address root, table_id, address).
///
/// Deriving it costs a KDF and two key schedules; the Encryptor may keep one
/// per (root, table_id, address) that repeats (global EMMs, at-rest rewrap).
/// Zeroized on drop (the `aes`/`cmac` crates' `zeroize` feature).
#[derive(Clone)]
pub struct SectionKeys {
    table_id: u8,
    address: [u8; MAX_ADDRESS_LEN],
    address_len: usize,
    /// Raw K_wrap, kept for the decryption key schedule of `open` (sealing
    /// only encrypts, so it uses the cheaper encryption-only schedule).
    k_wrap: Key128,
    wrap: Aes128Enc,
    mac: Aes128Cmac,
}

impl core::fmt::Debug for SectionKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SectionKeys")
            .field("table_id", &format_args!("{:#04x}", self.table_id))
            .field("keys", &"<redacted>")
            .finish()
    }
}

impl SectionKeys {
    /// Derives the keys of `address_root` for `table_id` and `address` (§3.2 bytes).
    pub fn derive(address_root: &Key128, table_id: u8, address: &[u8]) -> Result<Self, SealError> {
        let expected = address_len(table_id).ok_or(SealError::UnknownTableId(table_id))?;
        if address.len() != expected {
            return Err(SealError::AddressLength {
                table_id,
                expected,
                got: address.len(),
            });
        }
        let okm = derive_emm_okm(address_root, table_id, address);
        let k_wrap = key_from_okm(&okm, 0);
        let wrap = Aes128Enc::new(GenericArray::from_slice(&okm[..16]));
        let mac = <Aes128Cmac as KeyInit>::new(GenericArray::from_slice(&okm[16..]));
        let mut addr = [0u8; MAX_ADDRESS_LEN];
        addr[..address.len()].copy_from_slice(address);
        Ok(SectionKeys {
            table_id,
            address: addr,
            address_len: address.len(),
            k_wrap,
            wrap,
            mac,
        })
    }

    /// table_id these keys were derived for.
    pub fn table_id(&self) -> u8 {
        self.table_id
    }

    /// Address bytes these keys were derived for.
    pub fn address(&self) -> &[u8] {
        &self.address[..self.address_len]
    }

    /// Size of the section for a plaintext of `plaintext_len` bytes.
    pub fn section_len(&self, plaintext_len: usize) -> usize {
        SECTION_OVERHEAD + self.address_len + plaintext_len
    }

    /// Seals `plaintext` into a new section with a random IV and DEK.
    pub fn seal<R: RngCore + CryptoRng + ?Sized>(
        &self,
        table_id_extension: u16,
        key_version: u32,
        plaintext: &[u8],
        max_section_bytes: usize,
        rng: &mut R,
    ) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::new();
        self.seal_into(
            table_id_extension,
            key_version,
            plaintext.len(),
            |buf| buf.extend_from_slice(plaintext),
            max_section_bytes,
            rng,
            &mut out,
        )?;
        Ok(out)
    }

    /// Seals with a caller-chosen IV and DEK. Only for test vectors and
    /// known-answer tests: production code must use [`SectionKeys::seal`].
    pub fn seal_deterministic(
        &self,
        table_id_extension: u16,
        key_version: u32,
        plaintext: &[u8],
        max_section_bytes: usize,
        iv: &[u8; 16],
        dek: &Key128,
    ) -> Result<Vec<u8>, SealError> {
        check_size(
            self.section_len(plaintext.len()),
            max_section_bytes,
            plaintext.len(),
        )?;
        let mut out = Vec::with_capacity(self.section_len(plaintext.len()));
        self.write_section(
            table_id_extension,
            key_version,
            plaintext.len(),
            |buf| buf.extend_from_slice(plaintext),
            iv,
            dek,
            &mut out,
        )?;
        Ok(out)
    }

    /// Appends one sealed section to `out`. `write_plaintext` must append
    /// exactly `plaintext_len` bytes: the plaintext is written straight into
    /// the output buffer and encrypted in place, so no other copy exists. On
    /// error `out` is left as it was.
    #[allow(clippy::too_many_arguments)]
    pub fn seal_into<R: RngCore + CryptoRng + ?Sized>(
        &self,
        table_id_extension: u16,
        key_version: u32,
        plaintext_len: usize,
        write_plaintext: impl FnOnce(&mut Vec<u8>),
        max_section_bytes: usize,
        rng: &mut R,
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        check_size(
            self.section_len(plaintext_len),
            max_section_bytes,
            plaintext_len,
        )?;
        let mut iv = [0u8; 16];
        rng.fill_bytes(&mut iv);
        let dek = Key128::random(rng);
        self.write_section(
            table_id_extension,
            key_version,
            plaintext_len,
            write_plaintext,
            &iv,
            &dek,
            out,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn write_section(
        &self,
        table_id_extension: u16,
        key_version: u32,
        plaintext_len: usize,
        write_plaintext: impl FnOnce(&mut Vec<u8>),
        iv: &[u8; 16],
        dek: &Key128,
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let total = self.section_len(plaintext_len);
        // total <= 4096 was checked, and the table_id is one casd seals.
        let header = LongHeader::private(TableId(self.table_id), table_id_extension)
            .encode(total - HEADER_LEN - CRC_LEN)?;
        let start = out.len();
        out.reserve(total);
        out.extend_from_slice(&header);
        out.extend_from_slice(self.address());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&key_version.to_be_bytes());
        out.extend_from_slice(iv);
        let mut wrapped = GenericArray::clone_from_slice(dek.expose());
        self.wrap.encrypt_block(&mut wrapped);
        out.extend_from_slice(&wrapped);
        let ct_start = out.len();
        write_plaintext(out);
        let written = out.len() - ct_start;
        if written != plaintext_len {
            out[ct_start..].zeroize();
            out.truncate(start);
            return Err(SealError::PlaintextLengthMismatch {
                announced: plaintext_len,
                got: written,
            });
        }
        let mut ctr = Aes128Ctr::new(
            GenericArray::from_slice(dek.expose()),
            GenericArray::from_slice(iv),
        );
        ctr.apply_keystream(&mut out[ct_start..]);
        let mut mac = self.mac.clone();
        mac.update(&out[start..]);
        out.extend_from_slice(&mac.finalize().into_bytes());
        if let Err(e) = section::append_crc(out, start) {
            out.truncate(start);
            return Err(e.into());
        }
        Ok(())
    }

    /// Checks and decrypts a parsed section sealed with these keys.
    fn open_view(&self, view: &SectionView<'_>) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let mut mac = self.mac.clone();
        mac.update(view.authenticated);
        let tag = mac.finalize().into_bytes();
        if !bool::from(tag.as_slice().ct_eq(view.mac)) {
            return Err(OpenError::Mac);
        }
        let mut dek = Key128([0u8; KEY_LEN]);
        dek.0.copy_from_slice(view.wrapped_dek);
        Aes128Dec::new(GenericArray::from_slice(self.k_wrap.expose()))
            .decrypt_block(GenericArray::from_mut_slice(&mut dek.0));
        let mut plaintext = Zeroizing::new(view.ciphertext.to_vec());
        let mut ctr = Aes128Ctr::new(
            GenericArray::from_slice(dek.expose()),
            GenericArray::from_slice(view.iv),
        );
        ctr.apply_keystream(&mut plaintext);
        Ok(plaintext)
    }
}

fn check_size(size: usize, max: usize, plaintext: usize) -> Result<(), SealError> {
    if max > MAX_SECTION_BYTES_LIMIT {
        return Err(SealError::MaxSectionBytesOutOfRange(max));
    }
    if size > max {
        return Err(SealError::TooLarge {
            size,
            max,
            plaintext,
        });
    }
    Ok(())
}

/// What a section header and address carry, for [`seal_section`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionSpec<'a> {
    /// 0x82, 0x83, 0x84 (or 0x00 at rest).
    pub table_id: u8,
    /// emm_id mod 65536 (row id mod 65536 at rest).
    pub table_id_extension: u16,
    /// §3.2 address bytes.
    pub address: &'a [u8],
    /// Version of the address root (PMK / GK / GLK / root key generation).
    pub key_version: u32,
}

/// Seals `plaintext` into one complete section (header, address, envelope,
/// MAC, CRC) under `address_root`, with a fresh random IV and DEK.
pub fn seal_section<R: RngCore + CryptoRng + ?Sized>(
    address_root: &Key128,
    spec: &SectionSpec<'_>,
    plaintext: &[u8],
    max_section_bytes: usize,
    rng: &mut R,
) -> Result<Vec<u8>, SealError> {
    let expected = address_len(spec.table_id).ok_or(SealError::UnknownTableId(spec.table_id))?;
    // Size first, so that an oversize request costs no KDF.
    check_size(
        SECTION_OVERHEAD + expected + plaintext.len(),
        max_section_bytes,
        plaintext.len(),
    )?;
    SectionKeys::derive(address_root, spec.table_id, spec.address)?.seal(
        spec.table_id_extension,
        spec.key_version,
        plaintext,
        max_section_bytes,
        rng,
    )
}

// ---------------------------------------------------------------------------
// Parsing and opening
// ---------------------------------------------------------------------------

/// A structurally parsed section whose CRC has been checked, before any key
/// is used. Nothing in it is authenticated yet: use it to pick the key
/// (table_id, address, key_version), never to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionView<'a> {
    /// table_id.
    pub table_id: u8,
    /// table_id_extension (emm_id mod 65536).
    pub table_id_extension: u16,
    /// §3.2 address bytes.
    pub address: &'a [u8],
    /// Envelope key_version.
    pub key_version: u32,
    iv: &'a [u8],
    wrapped_dek: &'a [u8],
    ciphertext: &'a [u8],
    mac: &'a [u8],
    authenticated: &'a [u8],
}

impl SectionView<'_> {
    /// Ciphertext length (= plaintext length).
    pub fn ciphertext_len(&self) -> usize {
        self.ciphertext.len()
    }
}

/// Parses a section and checks its CRC (no key needed): header per §3.1,
/// section_length, minimal length for the table_id, CRC-32/MPEG-2,
/// format_version 0x01.
pub fn parse_section(section: &[u8]) -> Result<SectionView<'_>, OpenError> {
    let len = section.len();
    let Some(&table_id) = section.first() else {
        return Err(OpenError::Truncated { len });
    };
    let addr_len = address_len(table_id).ok_or(OpenError::UnknownTableId(table_id))?;
    if len < SECTION_OVERHEAD + addr_len {
        return Err(OpenError::Truncated { len });
    }
    let header = LongHeader::decode(section).map_err(|e| open_error(e, len))?;
    if !header.private_indicator {
        return Err(OpenError::BadHeader("private_indicator"));
    }
    let parsed = Section::parse(section).map_err(|e| open_error(e, len))?;
    if header.section_number != 0 || header.last_section_number != 0 {
        return Err(OpenError::BadHeader("section_number/last_section_number"));
    }
    let (authenticated, mac) = parsed.without_crc().split_at(len - CRC_LEN - MAC_LEN);
    let address = &authenticated[HEADER_LEN..HEADER_LEN + addr_len];
    let env = &authenticated[HEADER_LEN + addr_len..];
    if env[0] != FORMAT_VERSION {
        return Err(OpenError::UnsupportedFormatVersion(env[0]));
    }
    let key_version = u32::from_be_bytes([env[1], env[2], env[3], env[4]]);
    Ok(SectionView {
        table_id,
        table_id_extension: header.table_id_extension,
        address,
        key_version,
        iv: &env[5..21],
        wrapped_dek: &env[21..37],
        ciphertext: &env[37..],
        mac,
        authenticated,
    })
}

/// The envelope's error for what the carousel's section codec refused in a
/// buffer of `len` bytes (at least [`SECTION_OVERHEAD`], so never too short
/// for a header).
fn open_error(e: SectionError, len: usize) -> OpenError {
    match e {
        SectionError::NotLongSyntax => OpenError::BadHeader("section_syntax_indicator"),
        SectionError::CrcMismatch { stored, computed } => OpenError::Crc { computed, stored },
        // section_length disagrees with the bytes, or is below the long-syntax minimum.
        SectionError::LengthMismatch { declared, .. } => OpenError::LengthMismatch {
            declared: declared - section::LENGTH_PREFIX,
            actual: len - section::LENGTH_PREFIX,
        },
        SectionError::LengthTooSmall { section_length } => OpenError::LengthMismatch {
            declared: section_length,
            actual: len - section::LENGTH_PREFIX,
        },
        // A private section is at most 4096 bytes.
        SectionError::TooLong { .. } => OpenError::BadHeader("section_length"),
        SectionError::TooShort { .. }
        | SectionError::BodyTooLong { .. }
        | SectionError::VersionOutOfRange(_)
        | SectionError::StuffingTableId => OpenError::Truncated { len },
    }
}

/// An authenticated, decrypted section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedSection {
    /// table_id.
    pub table_id: u8,
    /// table_id_extension.
    pub table_id_extension: u16,
    /// §3.2 address bytes.
    pub address: Vec<u8>,
    /// Envelope key_version.
    pub key_version: u32,
    /// Decrypted plaintext (zeroized on drop: it may carry keys).
    pub plaintext: Zeroizing<Vec<u8>>,
}

/// Opens a section as a receiver does: CRC, then MAC in constant time, then
/// decryption. Keys are derived from `address_root` and the section's own
/// table_id and address.
pub fn open_section(address_root: &Key128, section: &[u8]) -> Result<OpenedSection, OpenError> {
    let view = parse_section(section)?;
    let keys = SectionKeys::derive(address_root, view.table_id, view.address)
        .map_err(|_| OpenError::UnknownTableId(view.table_id))?;
    open_parsed(&keys, &view)
}

/// Opens a section with already derived keys; refuses a section whose
/// table_id or address is not the one the keys were derived for.
pub fn open_section_with_keys(
    keys: &SectionKeys,
    section: &[u8],
) -> Result<OpenedSection, OpenError> {
    let view = parse_section(section)?;
    if view.table_id != keys.table_id() || view.address != keys.address() {
        // Different context means different keys: the MAC cannot match.
        return Err(OpenError::Mac);
    }
    open_parsed(keys, &view)
}

fn open_parsed(keys: &SectionKeys, view: &SectionView<'_>) -> Result<OpenedSection, OpenError> {
    let plaintext = keys.open_view(view)?;
    Ok(OpenedSection {
        table_id: view.table_id,
        table_id_extension: view.table_id_extension,
        address: view.address.to_vec(),
        key_version: view.key_version,
        plaintext,
    })
}

// ---------------------------------------------------------------------------
// At rest (§4)
// ---------------------------------------------------------------------------

/// Seals a key for the `keys` table row `row_id` under the root key.
///
/// The blob is a complete §3 section with table_id 0x00, table_id_extension
/// = row_id mod 65536, address = row_id (u64), key_version = `root_version`
/// (the generation of the root key) and plaintext = the 16 key bytes; always
/// [`AT_REST_BLOB_LEN`] (89) bytes. See `docs/format.md`.
pub fn seal_key_at_rest<R: RngCore + CryptoRng + ?Sized>(
    root: &Key128,
    root_version: u32,
    row_id: u64,
    key: &Key128,
    rng: &mut R,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(AT_REST_BLOB_LEN);
    let mut iv = [0u8; 16];
    rng.fill_bytes(&mut iv);
    let dek = Key128::random(rng);
    at_rest_keys(root, row_id).write_at_rest(row_id, root_version, key, &iv, &dek, &mut out);
    out
}

/// [`seal_key_at_rest`] with a caller-chosen IV and DEK: test vectors only.
pub fn seal_key_at_rest_deterministic(
    root: &Key128,
    root_version: u32,
    row_id: u64,
    key: &Key128,
    iv: &[u8; 16],
    dek: &Key128,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(AT_REST_BLOB_LEN);
    at_rest_keys(root, row_id).write_at_rest(row_id, root_version, key, iv, dek, &mut out);
    out
}

fn at_rest_keys(root: &Key128, row_id: u64) -> SectionKeys {
    let address = row_id.to_be_bytes();
    let okm = derive_emm_okm(root, TABLE_ID_AT_REST, &address);
    let mut addr = [0u8; MAX_ADDRESS_LEN];
    addr[..8].copy_from_slice(&address);
    SectionKeys {
        table_id: TABLE_ID_AT_REST,
        address: addr,
        address_len: 8,
        k_wrap: key_from_okm(&okm, 0),
        wrap: Aes128Enc::new(GenericArray::from_slice(&okm[..16])),
        mac: <Aes128Cmac as KeyInit>::new(GenericArray::from_slice(&okm[16..])),
    }
}

impl SectionKeys {
    fn write_at_rest(
        &self,
        row_id: u64,
        root_version: u32,
        key: &Key128,
        iv: &[u8; 16],
        dek: &Key128,
        out: &mut Vec<u8>,
    ) {
        // The writer always appends exactly 16 bytes and 89 <= 4096, so this cannot fail.
        let _ = self.write_section(
            row_id as u16,
            root_version,
            KEY_LEN,
            |buf| buf.extend_from_slice(key.expose()),
            iv,
            dek,
            out,
        );
    }
}

/// A key opened from the `keys` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsealedKey {
    /// key_version of the blob: the root key generation that sealed it.
    pub root_version: u32,
    /// The key.
    pub key: Key128,
}

/// Opens an at-rest blob for row `row_id`; refuses a blob of another row
/// (authentic but moved), one altered, or one sealed under another root.
pub fn open_key_at_rest(root: &Key128, row_id: u64, blob: &[u8]) -> Result<UnsealedKey, OpenError> {
    let view = parse_section(blob)?;
    if view.table_id != TABLE_ID_AT_REST {
        return Err(OpenError::UnknownTableId(view.table_id));
    }
    let keys = at_rest_keys(root, row_id);
    let found = u64::from_be_bytes(
        view.address
            .try_into()
            .map_err(|_| OpenError::Truncated { len: blob.len() })?,
    );
    if found != row_id {
        // Check authenticity under its own row first, so a forged row id is
        // reported as a MAC failure rather than a row mismatch.
        at_rest_keys(root, found).open_view(&view)?;
        return Err(OpenError::RowMismatch {
            expected: row_id,
            found,
        });
    }
    let plaintext = keys.open_view(&view)?;
    let key = Key128::from_slice(&plaintext).map_err(|e| OpenError::KeyLength(e.got))?;
    Ok(UnsealedKey {
        root_version: view.key_version,
        key,
    })
}

/// The root key generation an at-rest blob claims (unauthenticated; for
/// picking the root during a rewrap).
pub fn at_rest_root_version(blob: &[u8]) -> Result<u32, OpenError> {
    let view = parse_section(blob)?;
    if view.table_id != TABLE_ID_AT_REST {
        return Err(OpenError::UnknownTableId(view.table_id));
    }
    Ok(view.key_version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    #[test]
    fn crc_check_value() {
        assert_eq!(crc32_mpeg2(b"123456789"), 0x0376_E6E7);
    }

    #[test]
    fn key_debug_is_redacted() {
        let k = Key128::from_bytes([0xAB; 16]);
        let s = format!("{k:?}");
        assert_eq!(s, "Key128(<redacted>)");
        assert!(!s.to_lowercase().contains("ab"));
    }

    #[test]
    fn fingerprint_is_stable_and_distinct() {
        let a = Key128::from_bytes([1; 16]);
        let fa = key_fingerprint(&a);
        assert_eq!(fa.len(), 16);
        assert_eq!(fa, key_fingerprint(&a.clone()));
        assert_ne!(fa, key_fingerprint(&Key128::from_bytes([2; 16])));
        let mut expect = [0u8; 8];
        kdf_ctr_cmac(&a, LABEL_FINGERPRINT, &[], &mut expect).unwrap();
        assert_eq!(fa, hex::encode(expect));
    }

    #[test]
    fn key_eq_and_slice() {
        let a = Key128::from_bytes([1; 16]);
        assert_eq!(a, Key128::from_slice(&[1; 16]).unwrap());
        assert_ne!(a, Key128::from_bytes([2; 16]));
        assert_eq!(
            Key128::from_slice(&[0; 15]),
            Err(KeyLengthError { got: 15 })
        );
    }

    #[test]
    fn seal_open_roundtrip_all_tables() {
        let root = Key128::random(&mut OsRng);
        for (tid, addr) in [
            (TABLE_ID_UNIQUE, vec![0, 0, 0, 0, 0, 0, 0, 7]),
            (TABLE_ID_GROUP, vec![9; 36]),
            (TABLE_ID_GLOBAL, vec![]),
        ] {
            let spec = SectionSpec {
                table_id: tid,
                table_id_extension: 0x1234,
                address: &addr,
                key_version: 3,
            };
            let s = seal_section(&root, &spec, b"hello world", 256, &mut OsRng).unwrap();
            assert_eq!(s.len(), SECTION_OVERHEAD + addr.len() + 11);
            let o = open_section(&root, &s).unwrap();
            assert_eq!(&o.plaintext[..], b"hello world");
            assert_eq!(o.key_version, 3);
            assert_eq!(o.table_id_extension, 0x1234);
            assert_eq!(o.address, addr);
            let wrong = Key128::random(&mut OsRng);
            assert_eq!(open_section(&wrong, &s), Err(OpenError::Mac));
        }
    }

    #[test]
    fn refuses_oversize_and_bad_max() {
        let root = Key128::random(&mut OsRng);
        let spec = SectionSpec {
            table_id: TABLE_ID_GLOBAL,
            table_id_extension: 0,
            address: &[],
            key_version: 1,
        };
        let fits = vec![0u8; 256 - SECTION_OVERHEAD];
        assert_eq!(
            seal_section(&root, &spec, &fits, 256, &mut OsRng)
                .unwrap()
                .len(),
            256
        );
        let over = vec![0u8; 256 - SECTION_OVERHEAD + 1];
        assert!(matches!(
            seal_section(&root, &spec, &over, 256, &mut OsRng),
            Err(SealError::TooLarge {
                size: 257,
                max: 256,
                ..
            })
        ));
        assert_eq!(
            seal_section(&root, &spec, &fits, 4097, &mut OsRng),
            Err(SealError::MaxSectionBytesOutOfRange(4097))
        );
        let max = vec![0u8; 4096 - SECTION_OVERHEAD];
        let s = seal_section(&root, &spec, &max, 4096, &mut OsRng).unwrap();
        assert_eq!(s.len(), 4096);
        assert_eq!(open_section(&root, &s).unwrap().plaintext.len(), max.len());
    }

    #[test]
    fn parse_refuses_each_header_fault_with_its_error() {
        let root = Key128::random(&mut OsRng);
        let spec = SectionSpec {
            table_id: TABLE_ID_GLOBAL,
            table_id_extension: 7,
            address: &[],
            key_version: 1,
        };
        let good = seal_section(&root, &spec, b"abc", 256, &mut OsRng).unwrap();
        let len = good.len();
        // Header faults are reported before the CRC is looked at.
        let mut bits = good.clone();
        bits[1] &= 0x7F;
        assert_eq!(
            parse_section(&bits),
            Err(OpenError::BadHeader("section_syntax_indicator"))
        );
        let mut bits = good.clone();
        bits[1] &= !0x40;
        assert_eq!(
            parse_section(&bits),
            Err(OpenError::BadHeader("private_indicator"))
        );
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(
            parse_section(&longer),
            Err(OpenError::LengthMismatch {
                declared: len - 3,
                actual: len - 2
            })
        );
        let mut crc = good.clone();
        crc[len - 1] ^= 1;
        assert!(matches!(parse_section(&crc), Err(OpenError::Crc { .. })));
        // section_number is checked once the CRC holds.
        let mut numbered = good[..len - CRC_LEN].to_vec();
        numbered[6] = 1;
        let numbered = section::finish_with_crc(numbered).unwrap();
        assert_eq!(
            parse_section(&numbered),
            Err(OpenError::BadHeader("section_number/last_section_number"))
        );
        assert_eq!(
            parse_section(&good[..SECTION_OVERHEAD - 1]),
            Err(OpenError::Truncated {
                len: SECTION_OVERHEAD - 1
            })
        );
        assert_eq!(
            parse_section(&[0x42; 80]),
            Err(OpenError::UnknownTableId(0x42))
        );
        assert!(parse_section(&good).is_ok());
    }

    #[test]
    fn at_rest_roundtrip_and_row_binding() {
        let root = Key128::random(&mut OsRng);
        let key = Key128::random(&mut OsRng);
        let blob = seal_key_at_rest(&root, 2, 42, &key, &mut OsRng);
        assert_eq!(blob.len(), AT_REST_BLOB_LEN);
        assert_eq!(at_rest_root_version(&blob), Ok(2));
        let u = open_key_at_rest(&root, 42, &blob).unwrap();
        assert_eq!(u.key, key);
        assert_eq!(u.root_version, 2);
        assert_eq!(
            open_key_at_rest(&root, 43, &blob),
            Err(OpenError::RowMismatch {
                expected: 43,
                found: 42
            })
        );
        let other = Key128::random(&mut OsRng);
        assert_eq!(open_key_at_rest(&other, 42, &blob), Err(OpenError::Mac));
    }
}
