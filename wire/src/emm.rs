//! EMM addresses (§3.2), the EMM plaintext and its commands (§3.4), and the
//! two top-level pure functions [`seal_emm`] and [`open_emm`]. No I/O.
//!
//! One command type, [`Command`], generic over what a key delivery carries:
//! `Command<Key128>` travels on air (GROUP_KEY and GLOBAL_KEY hold a
//! zeroizing [`Key128`], never serialized); [`CommandSpec`] = `Command<()>`
//! is what the EMMG asks the Encryptor for (REST JSON) and what is stored for
//! review in `emms.emm_data`: a key delivery names a key *version* only.
//! [`resolve_commands`] turns requests into wire commands with a key look-up
//! closure that only the Encryptor has.

use crate::crypto::{
    self, Key128, OpenError, SealError, SectionKeys, KEY_LEN, TABLE_ID_GLOBAL, TABLE_ID_GROUP,
    TABLE_ID_UNIQUE,
};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

/// Command tags (§3.4).
pub mod tag {
    /// ENTITLEMENT_ADD.
    pub const ENTITLEMENT_ADD: u8 = 0x01;
    /// ENTITLEMENT_REMOVE.
    pub const ENTITLEMENT_REMOVE: u8 = 0x02;
    /// DEVICE_ENABLE.
    pub const DEVICE_ENABLE: u8 = 0x03;
    /// DEVICE_DISABLE.
    pub const DEVICE_DISABLE: u8 = 0x04;
    /// OSM.
    pub const OSM: u8 = 0x05;
    /// GROUP_KEY (unique EMMs, or group EMMs of its own group).
    pub const GROUP_KEY: u8 = 0x06;
    /// GLOBAL_KEY (unique or group EMMs).
    pub const GLOBAL_KEY: u8 = 0x07;
    /// ENTITLEMENT_SET.
    pub const ENTITLEMENT_SET: u8 = 0x08;
}

/// OSM flags bit 0: forced display.
pub const OSM_FLAG_FORCED: u8 = 0x01;

/// The OSM flags of a request: forced display or not (no other bit is
/// defined).
pub const fn osm_flags(forced: bool) -> u8 {
    if forced {
        OSM_FLAG_FORCED
    } else {
        0
    }
}
/// emm_id + issued_at + not_after.
pub const PLAINTEXT_HEADER_LEN: usize = 8 + 4 + 4;
/// tag + length.
pub const TLV_HEADER_LEN: usize = 3;
// Value lengths (§3.4), for encoding, decoding and sizing alike.
/// One entitlement (ENTITLEMENT_ADD's value): product_id, start, end.
const ENTITLEMENT_LEN: usize = 4 + 4 + 4;
/// ENTITLEMENT_REMOVE: product_id.
const ENTITLEMENT_REMOVE_LEN: usize = 4;
/// An OSM's value before its text: duration_s + flags.
const OSM_FIXED_LEN: usize = 2 + 1;
/// GROUP_KEY: group_id, slot, key_version, activates_at, key.
const GROUP_KEY_LEN: usize = 4 + 1 + 4 + 4 + KEY_LEN;
/// GLOBAL_KEY: key_version, activates_at, key.
const GLOBAL_KEY_LEN: usize = 4 + 4 + KEY_LEN;
/// ENTITLEMENT_SET before its entries: the count.
const ENTITLEMENT_SET_FIXED_LEN: usize = 2;

/// Value length of an ENTITLEMENT_SET of `n` entries: a u16 count, then the
/// entries.
pub const fn entitlement_set_value_len(n: usize) -> usize {
    ENTITLEMENT_SET_FIXED_LEN + ENTITLEMENT_LEN * n
}

/// Section bytes of an EMM besides its commands (their TLVs), for an address
/// of `address_len` bytes (§3.2: [`crypto::ADDRESS_LEN_UNIQUE`] and the
/// others): the sealed section's own overhead ([`crypto::SECTION_OVERHEAD`]:
/// header, envelope prefix, MAC, CRC), the address and the plaintext header
/// (emm_id, issued_at, not_after). The one place this sum is written: the
/// EMMG packs commands with it, the SMS API and the Scheduler size with it.
pub const fn emm_overhead(address_len: usize) -> usize {
    crypto::SECTION_OVERHEAD + address_len + PLAINTEXT_HEADER_LEN
}

/// The longest OSM text (UTF-8 bytes) that fits, as the only command, one
/// section of `max_section_bytes` to an address of `address_len` bytes.
pub const fn max_osm_text_len(max_section_bytes: usize, address_len: usize) -> usize {
    max_section_bytes.saturating_sub(emm_overhead(address_len) + TLV_HEADER_LEN + OSM_FIXED_LEN)
}

// ---------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------

/// A device id, 1 ..= 2^53 - 1 (§1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct DeviceId(u64);

impl DeviceId {
    /// Largest device id (2^53 - 1).
    pub const MAX: u64 = (1 << 53) - 1;

    /// Validates 1 ..= 2^53 - 1.
    pub fn new(id: u64) -> Result<Self, InvalidDeviceId> {
        if (1..=Self::MAX).contains(&id) {
            Ok(DeviceId(id))
        } else {
            Err(InvalidDeviceId(id))
        }
    }

    /// The raw id.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for DeviceId {
    type Error = InvalidDeviceId;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        DeviceId::new(v)
    }
}

impl From<DeviceId> for u64 {
    fn from(d: DeviceId) -> u64 {
        d.0
    }
}

impl core::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

/// A device id outside 1 ..= 2^53 - 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("device_id {0} is outside 1 ..= 2^53-1")]
pub struct InvalidDeviceId(pub u64);

/// An EMM id: unique per headend, increasing (§1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EmmId(pub u64);

impl EmmId {
    /// table_id_extension of its section: emm_id mod 65536.
    pub fn table_id_extension(self) -> u16 {
        self.0 as u16
    }
}

// ---------------------------------------------------------------------------
// Address
// ---------------------------------------------------------------------------

/// Sets slot `slot` in a group bitmap: bit (7 - slot % 8) of byte slot / 8.
pub fn bitmap_set_slot(bitmap: &mut [u8; 32], slot: u8) {
    bitmap[usize::from(slot / 8)] |= 0x80 >> (slot % 8);
}

/// Whether slot `slot` is set in a group bitmap.
pub fn bitmap_has_slot(bitmap: &[u8; 32], slot: u8) -> bool {
    bitmap[usize::from(slot / 8)] & (0x80 >> (slot % 8)) != 0
}

/// Slots set in a bitmap, ascending.
pub fn bitmap_slots(bitmap: &[u8; 32]) -> Vec<u8> {
    (0..=255u8)
        .filter(|&s| bitmap_has_slot(bitmap, s))
        .collect()
}

/// Who an EMM is for (§3.2).
///
/// JSON: `{"mode":"unique","device_id":7}`,
/// `{"mode":"group","group_id":3,"slots":[0,5]}`, `{"mode":"global"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "AddressJson", into = "AddressJson")]
pub enum Address {
    /// One device (table 0x82).
    Unique {
        /// The device.
        device_id: DeviceId,
    },
    /// Some slots of one group (table 0x83).
    Group {
        /// The group.
        group_id: u32,
        /// 256-slot bitmap, see [`bitmap_set_slot`].
        bitmap: [u8; 32],
    },
    /// Every device (table 0x84).
    Global,
}

/// §3.2 address bytes on the stack (at most 36).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AddressBytes {
    buf: [u8; 36],
    len: usize,
}

impl AddressBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl core::ops::Deref for AddressBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl core::fmt::Debug for AddressBytes {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "AddressBytes({})", hex::encode(self.as_slice()))
    }
}

impl Address {
    /// A group address with the given slots set.
    pub fn group_with_slots(group_id: u32, slots: impl IntoIterator<Item = u8>) -> Self {
        let mut bitmap = [0u8; 32];
        for s in slots {
            bitmap_set_slot(&mut bitmap, s);
        }
        Address::Group { group_id, bitmap }
    }

    /// 0x82 / 0x83 / 0x84.
    pub fn table_id(&self) -> u8 {
        match self {
            Address::Unique { .. } => TABLE_ID_UNIQUE,
            Address::Group { .. } => TABLE_ID_GROUP,
            Address::Global => TABLE_ID_GLOBAL,
        }
    }

    /// The §3.2 bytes that follow the section header (and form the KDF context
    /// after the table_id).
    pub fn address_bytes(&self) -> AddressBytes {
        let mut buf = [0u8; 36];
        let len = match self {
            Address::Unique { device_id } => {
                buf[..8].copy_from_slice(&device_id.get().to_be_bytes());
                8
            }
            Address::Group { group_id, bitmap } => {
                buf[..4].copy_from_slice(&group_id.to_be_bytes());
                buf[4..].copy_from_slice(bitmap);
                36
            }
            Address::Global => 0,
        };
        AddressBytes { buf, len }
    }

    /// Parses a table_id and §3.2 address bytes.
    pub fn from_wire(table_id: u8, bytes: &[u8]) -> Result<Self, DecodeError> {
        match (table_id, bytes.len()) {
            (TABLE_ID_UNIQUE, 8) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(bytes);
                let id = u64::from_be_bytes(b);
                Ok(Address::Unique {
                    device_id: DeviceId::new(id).map_err(|_| DecodeError::BadDeviceId(id))?,
                })
            }
            (TABLE_ID_GROUP, 36) => {
                let mut g = [0u8; 4];
                g.copy_from_slice(&bytes[..4]);
                let mut bitmap = [0u8; 32];
                bitmap.copy_from_slice(&bytes[4..]);
                Ok(Address::Group {
                    group_id: u32::from_be_bytes(g),
                    bitmap,
                })
            }
            (TABLE_ID_GLOBAL, 0) => Ok(Address::Global),
            (TABLE_ID_UNIQUE | TABLE_ID_GROUP | TABLE_ID_GLOBAL, got) => {
                Err(DecodeError::BadAddress { table_id, len: got })
            }
            _ => Err(DecodeError::NotAnEmmTable(table_id)),
        }
    }

    /// Section bytes of an EMM to this address besides its commands
    /// ([`emm_overhead`]).
    pub fn emm_overhead(&self) -> usize {
        emm_overhead(self.address_bytes().len())
    }

    /// Whether this is a unique address.
    pub fn is_unique(&self) -> bool {
        matches!(self, Address::Unique { .. })
    }

    /// Whether an EMM to this address may carry `command` (docs/format.md
    /// §3.4): a unique EMM anything; a group EMM a GROUP_KEY of its own
    /// group and GLOBAL_KEY (group-addressed rotation: sealed under the
    /// group's GK, so only holders of that GK learn the key); a global EMM
    /// no key (every device holds the GLK it would be sealed under).
    pub fn may_carry<K>(&self, command: &Command<K>) -> bool {
        match (self, command) {
            (Address::Unique { .. }, _) => true,
            (Address::Group { group_id, .. }, Command::GroupKey { group_id: g, .. }) => {
                g == group_id
            }
            (Address::Group { .. }, Command::GlobalKey { .. }) => true,
            (_, c) => !c.carries_key(),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
enum AddressJson {
    Unique { device_id: DeviceId },
    Group { group_id: u32, slots: Vec<u8> },
    // `{}` so that deny_unknown_fields also refuses `{"mode":"global","x":1}`.
    Global {},
}

impl TryFrom<AddressJson> for Address {
    type Error = &'static str;
    fn try_from(a: AddressJson) -> Result<Self, Self::Error> {
        Ok(match a {
            AddressJson::Unique { device_id } => Address::Unique { device_id },
            AddressJson::Group { group_id, slots } => {
                if slots.is_empty() {
                    return Err("a group address needs at least one slot");
                }
                Address::group_with_slots(group_id, slots)
            }
            AddressJson::Global {} => Address::Global,
        })
    }
}

impl From<Address> for AddressJson {
    fn from(a: Address) -> Self {
        match a {
            Address::Unique { device_id } => AddressJson::Unique { device_id },
            Address::Group { group_id, bitmap } => AddressJson::Group {
                group_id,
                slots: bitmap_slots(&bitmap),
            },
            Address::Global => AddressJson::Global {},
        }
    }
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// One entitlement: product, start and end (unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entitlement {
    /// Product (>= 1).
    pub product_id: u32,
    /// Start, unix seconds.
    pub start: u32,
    /// End, unix seconds.
    pub end: u32,
}

/// One §3.4 command: casd's one command vocabulary, generic over what a key
/// delivery (GROUP_KEY, GLOBAL_KEY) carries.
///
/// - `Command<Key128>`, the default, is what travels on air: key deliveries
///   hold the zeroizing key. Only it is encoded and decoded.
/// - [`CommandSpec`] = `Command<()>` is the request side: what the EMMG asks
///   the Encryptor for (REST JSON) and what `emms.emm_data` records. A key
///   delivery names its key by `group_id` / `key_version` and carries no key
///   bytes; [`CommandSpec::resolve`] fills the key in with a look-up that only
///   the Encryptor has.
///
/// Tags, value lengths and validation are written once, for both.
///
/// JSON (internally tagged by `"type"`, unknown fields refused). The key is
/// never serialized: a `Command<Key128>` renders as its request form, and
/// only a `Command<()>` can be deserialized (a key payload must be
/// `Default`, which [`Key128`] is not):
/// `{"type":"entitlement_add","product_id":1,"start":0,"end":100}`,
/// `{"type":"entitlement_remove","product_id":1}`, `{"type":"device_enable"}`,
/// `{"type":"device_disable"}`,
/// `{"type":"osm","duration_s":10,"forced":true,"text":"hi"}`,
/// `{"type":"group_key","group_id":3,"slot":5,"key_version":2,"activates_at":0}`,
/// `{"type":"global_key","key_version":2,"activates_at":0}`,
/// `{"type":"entitlement_set","entries":[{"product_id":1,"start":0,"end":9}]}`.
/// [`Command::Unknown`] (decode only) has no JSON form of its own: see
/// [`Command::review_json`].
///
/// `Debug` is safe: keys print as `Key128(<redacted>)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command<K = Key128> {
    /// 0x01.
    EntitlementAdd(Entitlement),
    /// 0x02.
    EntitlementRemove {
        /// Product.
        product_id: u32,
    },
    /// 0x03.
    #[serde(deserialize_with = "no_fields")]
    DeviceEnable,
    /// 0x04.
    #[serde(deserialize_with = "no_fields")]
    DeviceDisable,
    /// 0x05.
    Osm {
        /// Seconds on screen, 0 = until dismissed.
        duration_s: u16,
        /// Bit 0 forced display ([`OSM_FLAG_FORCED`]); other bits are carried
        /// as-is on air. JSON: `"forced": bool` (default false).
        #[serde(rename = "forced", with = "forced_flag", default)]
        flags: u8,
        /// UTF-8 text.
        text: String,
    },
    /// 0x06 (unique EMMs, or group EMMs of its own group).
    GroupKey {
        /// Group.
        group_id: u32,
        /// The device's slot in it.
        slot: u8,
        /// GK version.
        key_version: u32,
        /// When group EMMs switch to it (unix s).
        activates_at: u32,
        /// GK_{key_version}(group_id), or `()` on the request side.
        #[serde(skip)]
        key: K,
    },
    /// 0x07 (unique or group EMMs).
    GlobalKey {
        /// GLK version.
        key_version: u32,
        /// When global EMMs switch to it (unix s).
        activates_at: u32,
        /// GLK_{key_version}, or `()` on the request side.
        #[serde(skip)]
        key: K,
    },
    /// 0x08: the device's whole set.
    EntitlementSet {
        /// The whole set.
        entries: Vec<Entitlement>,
    },
    /// A tag this code does not know (decode only; receivers skip it).
    #[serde(skip)]
    Unknown {
        /// Tag.
        tag: u8,
        /// Raw value.
        value: Vec<u8>,
    },
}

/// The request side of [`Command`]: key deliveries name a key version and
/// carry no key bytes.
pub type CommandSpec = Command<()>;

/// Which key a key delivery needs from the key store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyRef {
    /// GK_{version}(group_id).
    Group {
        /// Group.
        group_id: u32,
        /// Version.
        key_version: u32,
    },
    /// GLK_{version}.
    Global {
        /// Version.
        key_version: u32,
    },
}

/// `DEVICE_ENABLE` / `DEVICE_DISABLE` have no fields; serde's
/// `deny_unknown_fields` does not reach unit variants of an internally
/// tagged enum, so this refuses `{"type":"device_enable","x":1}`.
fn no_fields<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoFields {}
    NoFields::deserialize(d).map(|NoFields {}| ())
}

/// OSM flags on air, `"forced": bool` in JSON (bit 0; the other bits are
/// defined by no one and not part of a request).
mod forced_flag {
    use super::OSM_FLAG_FORCED;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(flags: &u8, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(flags & OSM_FLAG_FORCED != 0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
        bool::deserialize(d).map(super::osm_flags)
    }
}

impl<K> Command<K> {
    /// The §3.4 tag.
    pub fn tag(&self) -> u8 {
        match self {
            Command::EntitlementAdd(_) => tag::ENTITLEMENT_ADD,
            Command::EntitlementRemove { .. } => tag::ENTITLEMENT_REMOVE,
            Command::DeviceEnable => tag::DEVICE_ENABLE,
            Command::DeviceDisable => tag::DEVICE_DISABLE,
            Command::Osm { .. } => tag::OSM,
            Command::GroupKey { .. } => tag::GROUP_KEY,
            Command::GlobalKey { .. } => tag::GLOBAL_KEY,
            Command::EntitlementSet { .. } => tag::ENTITLEMENT_SET,
            Command::Unknown { tag, .. } => *tag,
        }
    }

    /// Whether it carries key bytes on air (and so may travel only in unique EMMs).
    pub fn carries_key(&self) -> bool {
        matches!(self, Command::GroupKey { .. } | Command::GlobalKey { .. })
    }

    /// Length of the value on air (without tag and length); the same for
    /// the request side, whose key deliveries become 16 key bytes.
    pub fn value_len(&self) -> usize {
        match self {
            Command::EntitlementAdd(_) => ENTITLEMENT_LEN,
            Command::EntitlementRemove { .. } => ENTITLEMENT_REMOVE_LEN,
            Command::DeviceEnable | Command::DeviceDisable => 0,
            Command::Osm { text, .. } => OSM_FIXED_LEN + text.len(),
            Command::GroupKey { .. } => GROUP_KEY_LEN,
            Command::GlobalKey { .. } => GLOBAL_KEY_LEN,
            Command::EntitlementSet { entries } => entitlement_set_value_len(entries.len()),
            Command::Unknown { value, .. } => value.len(),
        }
    }

    /// Bytes it takes in the plaintext: tag, length and value.
    pub fn encoded_len(&self) -> usize {
        TLV_HEADER_LEN + self.value_len()
    }

    /// Checks what encoding needs: value length fits u16, product_id >= 1,
    /// ENTITLEMENT_SET count fits u16, unknown tags are not known ones.
    pub fn validate(&self) -> Result<(), EncodeError> {
        let len = self.value_len();
        if len > usize::from(u16::MAX) {
            return Err(EncodeError::ValueTooLong {
                tag: self.tag(),
                len,
            });
        }
        match self {
            Command::EntitlementAdd(e) if e.product_id == 0 => Err(EncodeError::ProductIdZero),
            Command::EntitlementRemove { product_id: 0 } => Err(EncodeError::ProductIdZero),
            Command::EntitlementSet { entries } if entries.iter().any(|e| e.product_id == 0) => {
                Err(EncodeError::ProductIdZero)
            }
            Command::Unknown { tag, .. }
                if (tag::ENTITLEMENT_ADD..=tag::ENTITLEMENT_SET).contains(tag) =>
            {
                Err(EncodeError::UnknownWithKnownTag(*tag))
            }
            _ => Ok(()),
        }
    }

    /// The key a key delivery needs, `None` for any other command.
    pub fn key_ref(&self) -> Option<KeyRef> {
        match self {
            Command::GroupKey {
                group_id,
                key_version,
                ..
            } => Some(KeyRef::Group {
                group_id: *group_id,
                key_version: *key_version,
            }),
            Command::GlobalKey { key_version, .. } => Some(KeyRef::Global {
                key_version: *key_version,
            }),
            _ => None,
        }
    }

    /// The same command with another key payload: `key` is asked for the
    /// payload of a key delivery (given its [`KeyRef`] and current payload)
    /// and its error is passed through.
    pub fn map_key<K2, E>(
        &self,
        key: impl FnOnce(KeyRef, &K) -> Result<K2, E>,
    ) -> Result<Command<K2>, E> {
        Ok(match self {
            Command::EntitlementAdd(e) => Command::EntitlementAdd(*e),
            Command::EntitlementRemove { product_id } => Command::EntitlementRemove {
                product_id: *product_id,
            },
            Command::DeviceEnable => Command::DeviceEnable,
            Command::DeviceDisable => Command::DeviceDisable,
            Command::Osm {
                duration_s,
                flags,
                text,
            } => Command::Osm {
                duration_s: *duration_s,
                flags: *flags,
                text: text.clone(),
            },
            Command::GroupKey {
                group_id,
                slot,
                key_version,
                activates_at,
                key: k,
            } => Command::GroupKey {
                group_id: *group_id,
                slot: *slot,
                key_version: *key_version,
                activates_at: *activates_at,
                key: key(
                    KeyRef::Group {
                        group_id: *group_id,
                        key_version: *key_version,
                    },
                    k,
                )?,
            },
            Command::GlobalKey {
                key_version,
                activates_at,
                key: k,
            } => Command::GlobalKey {
                key_version: *key_version,
                activates_at: *activates_at,
                key: key(
                    KeyRef::Global {
                        key_version: *key_version,
                    },
                    k,
                )?,
            },
            Command::EntitlementSet { entries } => Command::EntitlementSet {
                entries: entries.clone(),
            },
            Command::Unknown { tag, value } => Command::Unknown {
                tag: *tag,
                value: value.clone(),
            },
        })
    }

    /// The request-side form: the same command without key bytes.
    pub fn without_key(&self) -> CommandSpec {
        match self.map_key(|_, _| Ok::<(), core::convert::Infallible>(())) {
            Ok(spec) => spec,
            Err(never) => match never {},
        }
    }

    /// The reviewable JSON (`emms.emm_data`, the probe): the request form,
    /// no key bytes; an unknown tag as `{"type":"unknown","tag":N,"length":L}`.
    pub fn review_json(&self) -> serde_json::Value {
        match self {
            Command::Unknown { tag, value } => {
                serde_json::json!({"type": "unknown", "tag": tag, "length": value.len()})
            }
            c => serde_json::to_value(c).unwrap_or(serde_json::Value::Null),
        }
    }
}

impl CommandSpec {
    /// The wire command; `lookup` is asked for the key of GROUP_KEY /
    /// GLOBAL_KEY and its error is passed through.
    pub fn resolve<E>(
        &self,
        lookup: &mut impl FnMut(KeyRef) -> Result<Key128, E>,
    ) -> Result<Command, E> {
        self.map_key(|r, ()| lookup(r))
    }
}

impl Command {
    fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.tag());
        out.extend_from_slice(&(self.value_len() as u16).to_be_bytes());
        let ent = |out: &mut Vec<u8>, e: &Entitlement| {
            out.extend_from_slice(&e.product_id.to_be_bytes());
            out.extend_from_slice(&e.start.to_be_bytes());
            out.extend_from_slice(&e.end.to_be_bytes());
        };
        match self {
            Command::EntitlementAdd(e) => ent(out, e),
            Command::EntitlementRemove { product_id } => {
                out.extend_from_slice(&product_id.to_be_bytes())
            }
            Command::DeviceEnable | Command::DeviceDisable => {}
            Command::Osm {
                duration_s,
                flags,
                text,
            } => {
                out.extend_from_slice(&duration_s.to_be_bytes());
                out.push(*flags);
                out.extend_from_slice(text.as_bytes());
            }
            Command::GroupKey {
                group_id,
                slot,
                key_version,
                activates_at,
                key,
            } => {
                out.extend_from_slice(&group_id.to_be_bytes());
                out.push(*slot);
                out.extend_from_slice(&key_version.to_be_bytes());
                out.extend_from_slice(&activates_at.to_be_bytes());
                out.extend_from_slice(key.expose());
            }
            Command::GlobalKey {
                key_version,
                activates_at,
                key,
            } => {
                out.extend_from_slice(&key_version.to_be_bytes());
                out.extend_from_slice(&activates_at.to_be_bytes());
                out.extend_from_slice(key.expose());
            }
            Command::EntitlementSet { entries } => {
                out.extend_from_slice(&(entries.len() as u16).to_be_bytes());
                for e in entries {
                    ent(out, e);
                }
            }
            Command::Unknown { value, .. } => out.extend_from_slice(value),
        }
    }

    /// One TLV's value: the length a known tag requires is checked first
    /// ([`check_value_len`]), then the fields are read.
    fn decode(tag: u8, v: &[u8]) -> Result<Command, DecodeError> {
        check_value_len(tag, v)?;
        let u32_at = |i: usize| u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
        let ent_at = |i: usize| Entitlement {
            product_id: u32_at(i),
            start: u32_at(i + 4),
            end: u32_at(i + 8),
        };
        // The key is the value's last 16 bytes (the length is checked).
        let key_from = |at: usize| {
            Key128::from_slice(&v[at..]).map_err(|_| DecodeError::BadLength {
                tag,
                expected: at + KEY_LEN,
                got: v.len(),
            })
        };
        Ok(match tag {
            tag::ENTITLEMENT_ADD => Command::EntitlementAdd(ent_at(0)),
            tag::ENTITLEMENT_REMOVE => Command::EntitlementRemove {
                product_id: u32_at(0),
            },
            tag::DEVICE_ENABLE => Command::DeviceEnable,
            tag::DEVICE_DISABLE => Command::DeviceDisable,
            tag::OSM => Command::Osm {
                duration_s: u16::from_be_bytes([v[0], v[1]]),
                flags: v[2],
                text: core::str::from_utf8(&v[OSM_FIXED_LEN..])
                    .map_err(|_| DecodeError::BadUtf8)?
                    .to_owned(),
            },
            tag::GROUP_KEY => Command::GroupKey {
                group_id: u32_at(0),
                slot: v[4],
                key_version: u32_at(5),
                activates_at: u32_at(9),
                key: key_from(13)?,
            },
            tag::GLOBAL_KEY => Command::GlobalKey {
                key_version: u32_at(0),
                activates_at: u32_at(4),
                key: key_from(8)?,
            },
            tag::ENTITLEMENT_SET => Command::EntitlementSet {
                entries: (0..usize::from(u16::from_be_bytes([v[0], v[1]])))
                    .map(|k| ent_at(ENTITLEMENT_SET_FIXED_LEN + ENTITLEMENT_LEN * k))
                    .collect(),
            },
            _ => Command::Unknown {
                tag,
                value: v.to_vec(),
            },
        })
    }
}

/// Refuses a known tag's value of the wrong length: exact for the fixed
/// ones, at least duration_s + flags for an OSM, the count's for a set.
/// Unknown tags take any length.
fn check_value_len(tag: u8, v: &[u8]) -> Result<(), DecodeError> {
    let exact = |n: usize| (n, v.len() == n);
    let (expected, ok) = match tag {
        tag::ENTITLEMENT_ADD => exact(ENTITLEMENT_LEN),
        tag::ENTITLEMENT_REMOVE => exact(ENTITLEMENT_REMOVE_LEN),
        tag::DEVICE_ENABLE | tag::DEVICE_DISABLE => exact(0),
        tag::OSM => (OSM_FIXED_LEN, v.len() >= OSM_FIXED_LEN),
        tag::GROUP_KEY => exact(GROUP_KEY_LEN),
        tag::GLOBAL_KEY => exact(GLOBAL_KEY_LEN),
        tag::ENTITLEMENT_SET => match v {
            [hi, lo, ..] => exact(entitlement_set_value_len(usize::from(u16::from_be_bytes(
                [*hi, *lo],
            )))),
            _ => (ENTITLEMENT_SET_FIXED_LEN, false),
        },
        _ => return Ok(()),
    };
    if ok {
        Ok(())
    } else {
        Err(DecodeError::BadLength {
            tag,
            expected,
            got: v.len(),
        })
    }
}

/// Turns request-side commands into wire commands, asking `lookup` for each key.
pub fn resolve_commands<E>(
    specs: &[CommandSpec],
    mut lookup: impl FnMut(KeyRef) -> Result<Key128, E>,
) -> Result<Vec<Command>, E> {
    specs.iter().map(|s| s.resolve(&mut lookup)).collect()
}

// ---------------------------------------------------------------------------
// Plaintext
// ---------------------------------------------------------------------------

/// Why a plaintext could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// An EMM carries one or more commands.
    #[error("an EMM needs at least one command")]
    NoCommands,
    /// A command value longer than 65535 bytes.
    #[error("command {tag:#04x} value is {len} bytes, over 65535")]
    ValueTooLong {
        /// Tag.
        tag: u8,
        /// Length.
        len: usize,
    },
    /// product_id 0 (products are >= 1).
    #[error("product_id must be >= 1")]
    ProductIdZero,
    /// `Command::Unknown` used with a tag this code knows.
    #[error("Command::Unknown with known tag {0:#04x}")]
    UnknownWithKnownTag(u8),
    /// GROUP_KEY / GLOBAL_KEY in an EMM whose address may not carry it
    /// ([`Address::may_carry`]).
    #[error("command {tag:#04x} carries a key this address may not carry (GROUP_KEY: unique or its own group; GLOBAL_KEY: unique or group)")]
    KeyCommandNotAllowed {
        /// Tag.
        tag: u8,
    },
}

/// Why a plaintext (or address) could not be decoded. Decoding never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than emm_id + issued_at + not_after.
    #[error("plaintext of {0} bytes is shorter than its 16-byte header")]
    ShortHeader(usize),
    /// No command after the header.
    #[error("the EMM carries no command")]
    NoCommands,
    /// Fewer than 3 bytes left for a tag and length.
    #[error("truncated TLV header at plaintext offset {offset}")]
    TruncatedTlv {
        /// Offset.
        offset: usize,
    },
    /// The length runs past the end.
    #[error("command {tag:#04x} at offset {offset} says {len} bytes, {available} remain")]
    TlvOverrun {
        /// Tag.
        tag: u8,
        /// Offset of the tag.
        offset: usize,
        /// Declared length.
        len: usize,
        /// Bytes left.
        available: usize,
    },
    /// A known command's value has the wrong length.
    #[error("command {tag:#04x} value is {got} bytes, expected {expected}")]
    BadLength {
        /// Tag.
        tag: u8,
        /// Expected (minimum for OSM and ENTITLEMENT_SET's count).
        expected: usize,
        /// Got.
        got: usize,
    },
    /// OSM text is not UTF-8.
    #[error("OSM text is not valid UTF-8")]
    BadUtf8,
    /// Not 0x82/0x83/0x84.
    #[error("table_id {0:#04x} is not an EMM table")]
    NotAnEmmTable(u8),
    /// Address of the wrong length.
    #[error("address for table_id {table_id:#04x} has {len} bytes")]
    BadAddress {
        /// table_id.
        table_id: u8,
        /// Length.
        len: usize,
    },
    /// Unique address with device_id 0 or >= 2^53.
    #[error("unique address device_id {0} is outside 1 ..= 2^53-1")]
    BadDeviceId(u64),
    /// table_id_extension is not emm_id mod 65536.
    #[error("table_id_extension {extension:#06x} is not emm_id mod 65536 ({expected:#06x})")]
    ExtensionMismatch {
        /// From the header.
        extension: u16,
        /// From the plaintext.
        expected: u16,
    },
    /// A key command in an EMM whose address may not carry it
    /// ([`Address::may_carry`]).
    #[error("command {tag:#04x} carries a key this address may not carry")]
    KeyCommandNotAllowed {
        /// Tag.
        tag: u8,
    },
}

/// The §3.4 plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmmPlaintext {
    /// emm_id.
    pub emm_id: EmmId,
    /// issued_at, unix s.
    pub issued_at: u32,
    /// not_after, unix s.
    pub not_after: u32,
    /// One or more commands.
    pub commands: Vec<Command>,
}

/// Encoded length of a plaintext with these commands.
pub fn plaintext_len(commands: &[Command]) -> usize {
    PLAINTEXT_HEADER_LEN + commands.iter().map(Command::encoded_len).sum::<usize>()
}

fn validate_commands(commands: &[Command]) -> Result<(), EncodeError> {
    if commands.is_empty() {
        return Err(EncodeError::NoCommands);
    }
    commands.iter().try_for_each(Command::validate)
}

fn encode_plaintext_into(
    emm_id: EmmId,
    issued_at: u32,
    not_after: u32,
    commands: &[Command],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&emm_id.0.to_be_bytes());
    out.extend_from_slice(&issued_at.to_be_bytes());
    out.extend_from_slice(&not_after.to_be_bytes());
    for c in commands {
        c.encode_into(out);
    }
}

impl EmmPlaintext {
    /// Encodes (zeroized on drop: it may carry keys).
    pub fn encode(&self) -> Result<zeroize::Zeroizing<Vec<u8>>, EncodeError> {
        validate_commands(&self.commands)?;
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(plaintext_len(&self.commands)));
        encode_plaintext_into(
            self.emm_id,
            self.issued_at,
            self.not_after,
            &self.commands,
            &mut out,
        );
        Ok(out)
    }

    /// Decodes; unknown tags become [`Command::Unknown`].
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < PLAINTEXT_HEADER_LEN {
            return Err(DecodeError::ShortHeader(b.len()));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[..8]);
        let issued_at = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
        let not_after = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        let mut commands = Vec::new();
        let mut off = PLAINTEXT_HEADER_LEN;
        while off < b.len() {
            if b.len() - off < TLV_HEADER_LEN {
                return Err(DecodeError::TruncatedTlv { offset: off });
            }
            let t = b[off];
            let len = usize::from(u16::from_be_bytes([b[off + 1], b[off + 2]]));
            let available = b.len() - off - TLV_HEADER_LEN;
            if len > available {
                return Err(DecodeError::TlvOverrun {
                    tag: t,
                    offset: off,
                    len,
                    available,
                });
            }
            let v = &b[off + TLV_HEADER_LEN..off + TLV_HEADER_LEN + len];
            commands.push(Command::decode(t, v)?);
            off += TLV_HEADER_LEN + len;
        }
        if commands.is_empty() {
            return Err(DecodeError::NoCommands);
        }
        Ok(EmmPlaintext {
            emm_id: EmmId(u64::from_be_bytes(id)),
            issued_at,
            not_after,
            commands,
        })
    }
}

// ---------------------------------------------------------------------------
// Seal / open
// ---------------------------------------------------------------------------

/// Everything one EMM section is made of, keys aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealInput {
    /// emm_id (table_id_extension = emm_id mod 65536).
    pub emm_id: EmmId,
    /// issued_at, unix s.
    pub issued_at: u32,
    /// not_after, unix s.
    pub not_after: u32,
    /// Who it is for.
    pub address: Address,
    /// Version of the address root (PMK for unique, GK for group, GLK for global).
    pub key_version: u32,
    /// One or more commands, keys filled in.
    pub commands: Vec<Command>,
}

/// Why an EMM could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealEmmError {
    /// The commands could not be encoded (or break the unique-only rule).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The section could not be built (too large, bad max_section_bytes).
    #[error(transparent)]
    Seal(#[from] SealError),
    /// `seal_emm_with_keys` got keys derived for another address.
    #[error("the section keys were derived for another address")]
    KeysForOtherAddress,
}

impl SealInput {
    /// Checks the commands (non-empty, encodable, keys only where the
    /// address may carry them).
    pub fn validate(&self) -> Result<(), EncodeError> {
        validate_commands(&self.commands)?;
        if let Some(c) = self.commands.iter().find(|c| !self.address.may_carry(c)) {
            return Err(EncodeError::KeyCommandNotAllowed { tag: c.tag() });
        }
        Ok(())
    }

    /// Encoded plaintext length.
    pub fn plaintext_len(&self) -> usize {
        plaintext_len(&self.commands)
    }

    /// Size of the sealed section.
    pub fn section_len(&self) -> usize {
        self.address.emm_overhead()
            + self
                .commands
                .iter()
                .map(Command::encoded_len)
                .sum::<usize>()
    }

    /// Derives the section keys of this input's address under `address_root`.
    pub fn section_keys(&self, address_root: &Key128) -> Result<SectionKeys, SealError> {
        SectionKeys::derive(
            address_root,
            self.address.table_id(),
            &self.address.address_bytes(),
        )
    }
}

/// Seals one EMM into a complete section (§3) under `address_root`
/// (DUK for unique, GK_n for group, GLK_n for global).
pub fn seal_emm<R: RngCore + CryptoRng + ?Sized>(
    input: &SealInput,
    address_root: &Key128,
    max_section_bytes: usize,
    rng: &mut R,
) -> Result<Vec<u8>, SealEmmError> {
    input.validate()?;
    let size = input.section_len();
    if max_section_bytes > crypto::MAX_SECTION_BYTES_LIMIT {
        return Err(SealError::MaxSectionBytesOutOfRange(max_section_bytes).into());
    }
    if size > max_section_bytes {
        // Refuse before paying for the KDF.
        return Err(SealError::TooLarge {
            size,
            max: max_section_bytes,
            plaintext: input.plaintext_len(),
        }
        .into());
    }
    let keys = input.section_keys(address_root)?;
    seal_emm_with_keys(input, &keys, max_section_bytes, rng)
}

/// [`seal_emm`] with keys already derived (and perhaps cached) for the
/// input's address; refuses keys of another address.
pub fn seal_emm_with_keys<R: RngCore + CryptoRng + ?Sized>(
    input: &SealInput,
    keys: &SectionKeys,
    max_section_bytes: usize,
    rng: &mut R,
) -> Result<Vec<u8>, SealEmmError> {
    input.validate()?;
    if keys.table_id() != input.address.table_id()
        || keys.address() != input.address.address_bytes().as_slice()
    {
        return Err(SealEmmError::KeysForOtherAddress);
    }
    let mut out = Vec::new();
    keys.seal_into(
        input.emm_id.table_id_extension(),
        input.key_version,
        input.plaintext_len(),
        |buf| {
            encode_plaintext_into(
                input.emm_id,
                input.issued_at,
                input.not_after,
                &input.commands,
                buf,
            )
        },
        max_section_bytes,
        rng,
        &mut out,
    )?;
    Ok(out)
}

/// A verified, decrypted EMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedEmm {
    /// Address from the section.
    pub address: Address,
    /// Envelope key_version.
    pub key_version: u32,
    /// emm_id.
    pub emm_id: EmmId,
    /// issued_at.
    pub issued_at: u32,
    /// not_after.
    pub not_after: u32,
    /// Decoded commands (unknown tags kept as [`Command::Unknown`]).
    pub commands: Vec<Command>,
}

/// Why an EMM section was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenEmmError {
    /// CRC, MAC, header or length.
    #[error(transparent)]
    Section(#[from] OpenError),
    /// Authentic, but the plaintext or address does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Opens an EMM section as a receiver does (CRC, MAC, decrypt, decode) and
/// checks table_id_extension = emm_id mod 65536 and that key commands only
/// arrive where the address may carry them ([`Address::may_carry`]).
pub fn open_emm(section: &[u8], address_root: &Key128) -> Result<OpenedEmm, OpenEmmError> {
    let opened = crypto::open_section(address_root, section)?;
    let address = Address::from_wire(opened.table_id, &opened.address)?;
    let p = EmmPlaintext::decode(&opened.plaintext)?;
    if p.emm_id.table_id_extension() != opened.table_id_extension {
        return Err(DecodeError::ExtensionMismatch {
            extension: opened.table_id_extension,
            expected: p.emm_id.table_id_extension(),
        }
        .into());
    }
    if let Some(c) = p.commands.iter().find(|c| !address.may_carry(c)) {
        return Err(DecodeError::KeyCommandNotAllowed { tag: c.tag() }.into());
    }
    Ok(OpenedEmm {
        address,
        key_version: opened.key_version,
        emm_id: p.emm_id,
        issued_at: p.issued_at,
        not_after: p.not_after,
        commands: p.commands,
    })
}

// ---------------------------------------------------------------------------
// Review rendering
// ---------------------------------------------------------------------------

/// The reviewable JSON of one EMM for `emms.emm_data`: header fields,
/// address, key_version and the commands in their request form (no key
/// bytes; see [`Command::review_json`]).
pub fn review_json(input: &SealInput) -> serde_json::Value {
    let commands: Vec<serde_json::Value> =
        input.commands.iter().map(Command::review_json).collect();
    serde_json::json!({
        "emm_id": input.emm_id.0,
        "issued_at": input.issued_at,
        "not_after": input.not_after,
        "address": input.address,
        "key_version": input.key_version,
        "commands": commands,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    fn unique(id: u64) -> Address {
        Address::Unique {
            device_id: DeviceId::new(id).unwrap(),
        }
    }

    fn input(address: Address, commands: Vec<Command>) -> SealInput {
        SealInput {
            emm_id: EmmId(0x1_0002),
            issued_at: 1_700_000_000,
            not_after: 1_700_086_400,
            address,
            key_version: 1,
            commands,
        }
    }

    #[test]
    fn device_id_range() {
        assert!(DeviceId::new(0).is_err());
        assert!(DeviceId::new(1).is_ok());
        assert!(DeviceId::new(DeviceId::MAX).is_ok());
        assert!(DeviceId::new(DeviceId::MAX + 1).is_err());
        assert!(serde_json::from_str::<DeviceId>("0").is_err());
    }

    #[test]
    fn bitmap_bits() {
        let mut b = [0u8; 32];
        bitmap_set_slot(&mut b, 0);
        bitmap_set_slot(&mut b, 9);
        bitmap_set_slot(&mut b, 255);
        assert_eq!(b[0], 0x80);
        assert_eq!(b[1], 0x40);
        assert_eq!(b[31], 0x01);
        assert_eq!(bitmap_slots(&b), vec![0, 9, 255]);
    }

    #[test]
    fn address_json_shapes() {
        let a = Address::group_with_slots(3, [5, 1]);
        let j = serde_json::to_string(&a).unwrap();
        assert_eq!(j, r#"{"mode":"group","group_id":3,"slots":[1,5]}"#);
        assert_eq!(serde_json::from_str::<Address>(&j).unwrap(), a);
        assert_eq!(
            serde_json::to_string(&unique(7)).unwrap(),
            r#"{"mode":"unique","device_id":7}"#
        );
        assert!(serde_json::from_str::<Address>(r#"{"mode":"unique","device_id":0}"#).is_err());
        assert!(
            serde_json::from_str::<Address>(r#"{"mode":"group","group_id":1,"slots":[]}"#).is_err()
        );
        assert!(serde_json::from_str::<Address>(r#"{"mode":"global","x":1}"#).is_err());
    }

    #[test]
    fn all_commands_roundtrip() {
        let k = Key128::from_bytes([7; 16]);
        let cmds = vec![
            Command::EntitlementAdd(Entitlement {
                product_id: 1,
                start: 2,
                end: 3,
            }),
            Command::EntitlementRemove { product_id: 9 },
            Command::DeviceEnable,
            Command::DeviceDisable,
            Command::Osm {
                duration_s: 30,
                flags: OSM_FLAG_FORCED,
                text: "Grüß".into(),
            },
            Command::GroupKey {
                group_id: 4,
                slot: 200,
                key_version: 5,
                activates_at: 6,
                key: k.clone(),
            },
            Command::GlobalKey {
                key_version: 7,
                activates_at: 8,
                key: k,
            },
            Command::EntitlementSet {
                entries: vec![
                    Entitlement {
                        product_id: 1,
                        start: 0,
                        end: 10,
                    },
                    Entitlement {
                        product_id: 2,
                        start: 5,
                        end: 15,
                    },
                ],
            },
            Command::Unknown {
                tag: 0x7F,
                value: vec![1, 2, 3],
            },
        ];
        let p = EmmPlaintext {
            emm_id: EmmId(42),
            issued_at: 100,
            not_after: 200,
            commands: cmds,
        };
        let enc = p.encode().unwrap();
        assert_eq!(enc.len(), plaintext_len(&p.commands));
        assert_eq!(EmmPlaintext::decode(&enc).unwrap(), p);
    }

    #[test]
    fn decode_errors() {
        let mut b = vec![0u8; 16];
        assert_eq!(
            EmmPlaintext::decode(&b[..5]),
            Err(DecodeError::ShortHeader(5))
        );
        assert_eq!(EmmPlaintext::decode(&b), Err(DecodeError::NoCommands));
        b.extend_from_slice(&[1, 0]);
        assert_eq!(
            EmmPlaintext::decode(&b),
            Err(DecodeError::TruncatedTlv { offset: 16 })
        );
        b.push(12);
        assert!(matches!(
            EmmPlaintext::decode(&b),
            Err(DecodeError::TlvOverrun { .. })
        ));
        let mut c = vec![0u8; 16];
        c.extend_from_slice(&[2, 0, 3, 0, 0, 0]);
        assert_eq!(
            EmmPlaintext::decode(&c),
            Err(DecodeError::BadLength {
                tag: 2,
                expected: 4,
                got: 3
            })
        );
        let mut d = vec![0u8; 16];
        d.extend_from_slice(&[5, 0, 4, 0, 0, 0, 0xFF]);
        assert_eq!(EmmPlaintext::decode(&d), Err(DecodeError::BadUtf8));
    }

    #[test]
    fn seal_open_each_mode() {
        let root = Key128::random(&mut OsRng);
        for a in [
            unique(12345),
            Address::group_with_slots(9, [0, 3, 255]),
            Address::Global,
        ] {
            let inp = input(
                a.clone(),
                vec![Command::EntitlementAdd(Entitlement {
                    product_id: 1,
                    start: 0,
                    end: 99,
                })],
            );
            let s = seal_emm(&inp, &root, 256, &mut OsRng).unwrap();
            assert_eq!(s.len(), inp.section_len());
            assert_eq!(&s[3..5], &[0x00, 0x02]);
            let o = open_emm(&s, &root).unwrap();
            assert_eq!(o.address, a);
            assert_eq!(o.emm_id, inp.emm_id);
            assert_eq!(o.commands, inp.commands);
        }
    }

    #[test]
    fn key_commands_only_where_the_address_may_carry_them() {
        let root = Key128::random(&mut OsRng);
        let glk = Command::GlobalKey {
            key_version: 1,
            activates_at: 0,
            key: Key128::random(&mut OsRng),
        };
        let gk = |group_id| Command::GroupKey {
            group_id,
            slot: 0,
            key_version: 2,
            activates_at: 0,
            key: Key128::random(&mut OsRng),
        };
        let refused = |tag| {
            Err(SealEmmError::Encode(EncodeError::KeyCommandNotAllowed {
                tag,
            }))
        };
        let group = Address::group_with_slots(1, [1]);
        for (a, c, tag) in [
            (Address::Global, glk.clone(), 7),
            (Address::Global, gk(1), 6),
            (group.clone(), gk(2), 6),
        ] {
            assert_eq!(
                seal_emm(&input(a, vec![c]), &root, 256, &mut OsRng),
                refused(tag)
            );
        }
        for (a, c) in [
            (unique(1), glk.clone()),
            (unique(1), gk(9)),
            (group.clone(), glk),
            (group.clone(), gk(1)),
        ] {
            let s = seal_emm(&input(a, vec![c]), &root, 256, &mut OsRng).unwrap();
            assert!(open_emm(&s, &root).is_ok());
        }
        // A receiver refuses another group's key in a group EMM even when
        // the MAC is right (sealed by hand around the encoder's check).
        let p = EmmPlaintext {
            emm_id: EmmId(2),
            issued_at: 1,
            not_after: 2,
            commands: vec![gk(2)],
        };
        let keys = input(group.clone(), vec![]).section_keys(&root).unwrap();
        let s = keys
            .seal(2, 1, &p.encode().unwrap(), 256, &mut OsRng)
            .unwrap();
        assert!(matches!(
            open_emm(&s, &root),
            Err(OpenEmmError::Decode(DecodeError::KeyCommandNotAllowed {
                tag: 6
            }))
        ));
    }

    #[test]
    fn oversize_refused() {
        let root = Key128::random(&mut OsRng);
        let inp = input(
            unique(1),
            vec![Command::Osm {
                duration_s: 0,
                flags: 0,
                text: "x".repeat(300),
            }],
        );
        assert!(matches!(
            seal_emm(&inp, &root, 256, &mut OsRng),
            Err(SealEmmError::Seal(SealError::TooLarge { max: 256, .. }))
        ));
        assert!(seal_emm(&inp, &root, 1024, &mut OsRng).is_ok());
    }

    #[test]
    fn specs_resolve_and_render_without_keys() {
        let json = r#"[{"type":"entitlement_add","product_id":1,"start":0,"end":100},
            {"type":"group_key","group_id":3,"slot":5,"key_version":2,"activates_at":50},
            {"type":"global_key","key_version":4,"activates_at":60},
            {"type":"osm","duration_s":10,"text":"hi"}]"#;
        let specs: Vec<CommandSpec> = serde_json::from_str(json).unwrap();
        let gk = Key128::from_bytes([0x5A; 16]);
        let glk = Key128::from_bytes([0xA5; 16]);
        let cmds = resolve_commands(&specs, |r| match r {
            KeyRef::Group {
                group_id: 3,
                key_version: 2,
            } => Ok(gk.clone()),
            KeyRef::Global { key_version: 4 } => Ok(glk.clone()),
            other => Err(format!("no key {other:?}")),
        })
        .unwrap();
        assert!(matches!(&cmds[1], Command::GroupKey { key, .. } if *key == gk));
        let back: Vec<CommandSpec> = cmds.iter().map(Command::without_key).collect();
        assert_eq!(back, specs);
        // One length table: a request takes the bytes its wire command takes.
        for (spec, cmd) in specs.iter().zip(&cmds) {
            assert_eq!(spec.encoded_len(), cmd.encoded_len());
            assert_eq!(spec.tag(), cmd.tag());
            assert_eq!(spec.key_ref(), cmd.key_ref());
        }
        let missing = resolve_commands(&specs, |_| Err("missing"));
        assert_eq!(missing, Err("missing"));
        let review = review_json(&input(unique(8), cmds)).to_string();
        assert!(!review.to_lowercase().contains("5a5a"));
        assert!(!review.contains("90,90"));
        assert!(review.contains(r#""type":"group_key""#));
        assert!(serde_json::from_str::<CommandSpec>(r#"{"type":"device_enable","x":1}"#).is_err());
        assert!(serde_json::from_str::<CommandSpec>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn overhead_is_what_sealing_adds() {
        assert_eq!(unique(1).emm_overhead(), 89);
        assert_eq!(Address::group_with_slots(1, [0]).emm_overhead(), 117);
        assert_eq!(Address::Global.emm_overhead(), 81);
        let root = Key128::random(&mut OsRng);
        for a in [
            unique(5),
            Address::group_with_slots(1, [0]),
            Address::Global,
        ] {
            let text_len = max_osm_text_len(256, a.address_bytes().len());
            let osm = Command::Osm {
                duration_s: 0,
                flags: 0,
                text: "x".repeat(text_len),
            };
            let inp = input(a.clone(), vec![osm]);
            assert_eq!(seal_emm(&inp, &root, 256, &mut OsRng).unwrap().len(), 256);
            let set = Command::EntitlementSet {
                entries: vec![
                    Entitlement {
                        product_id: 1,
                        start: 0,
                        end: 1
                    };
                    4
                ],
            };
            let inp = input(a.clone(), vec![set]);
            assert_eq!(
                seal_emm(&inp, &root, 256, &mut OsRng).unwrap().len(),
                a.emm_overhead() + TLV_HEADER_LEN + entitlement_set_value_len(4)
            );
        }
    }

    #[test]
    fn command_json_is_the_request_form() {
        let wire = Command::GroupKey {
            group_id: 3,
            slot: 5,
            key_version: 2,
            activates_at: 50,
            key: Key128::from_bytes([0x5A; 16]),
        };
        let j = serde_json::to_string(&wire).unwrap();
        assert_eq!(
            j,
            r#"{"type":"group_key","group_id":3,"slot":5,"key_version":2,"activates_at":50}"#
        );
        assert_eq!(
            serde_json::from_str::<CommandSpec>(&j).unwrap(),
            wire.without_key()
        );
        // A key in a request is an unknown field.
        assert!(serde_json::from_str::<CommandSpec>(
            r#"{"type":"global_key","key_version":2,"activates_at":0,"key":"00"}"#
        )
        .is_err());
        // OSM flags are `forced` in JSON, default false.
        let osm: CommandSpec =
            serde_json::from_str(r#"{"type":"osm","duration_s":10,"text":"hi"}"#).unwrap();
        assert!(matches!(osm, Command::Osm { flags: 0, .. }));
        let forced = Command::<()>::Osm {
            duration_s: 1,
            flags: OSM_FLAG_FORCED,
            text: "x".into(),
        };
        let j = serde_json::to_string(&forced).unwrap();
        assert_eq!(
            j,
            r#"{"type":"osm","duration_s":1,"forced":true,"text":"x"}"#
        );
        assert_eq!(serde_json::from_str::<CommandSpec>(&j).unwrap(), forced);
        assert_eq!(
            serde_json::to_string(&CommandSpec::DeviceEnable).unwrap(),
            r#"{"type":"device_enable"}"#
        );
        assert_eq!(
            serde_json::from_str::<CommandSpec>(r#"{"type":"device_disable"}"#).unwrap(),
            Command::DeviceDisable
        );
        assert!(serde_json::from_str::<CommandSpec>(r#"{"type":"device_disable","x":1}"#).is_err());
        let set: CommandSpec = serde_json::from_str(
            r#"{"type":"entitlement_set","entries":[{"product_id":1,"start":0,"end":9}]}"#,
        )
        .unwrap();
        assert_eq!(set.value_len(), 2 + 12);
        // An unknown tag has only a review form.
        let unknown: Command = Command::Unknown {
            tag: 0x7F,
            value: vec![1, 2, 3],
        };
        assert!(serde_json::to_value(&unknown).is_err());
        assert_eq!(
            unknown.review_json(),
            serde_json::json!({"type": "unknown", "tag": 0x7F, "length": 3})
        );
    }

    #[test]
    fn cached_keys_must_match_address() {
        let root = Key128::random(&mut OsRng);
        let inp = input(Address::Global, vec![Command::DeviceEnable]);
        let keys = inp.section_keys(&root).unwrap();
        assert!(seal_emm_with_keys(&inp, &keys, 256, &mut OsRng).is_ok());
        let other = input(unique(3), vec![Command::DeviceEnable]);
        assert_eq!(
            seal_emm_with_keys(&other, &keys, 256, &mut OsRng),
            Err(SealEmmError::KeysForOtherAddress)
        );
    }
}
