//! The SMS commands as validated domain types, and the parser that turns a
//! raw request body into them (sms-api.md "Commands"; identities of
//! docs/format.md §1).
//!
//! Parsing is strict: the body must be one JSON object; every field of the
//! command must be there with the right JSON type and range; a field the
//! command does not know, or a field given twice, is refused (a misspelt
//! optional field such as `forcd` must not be silently ignored). Every
//! refusal names the field at fault.
//!
//! Times are RFC 3339 strings (any offset; fractional seconds are dropped)
//! or unix seconds as a JSON integer, and must fall in the u32 range of the
//! wire format (1970-01-01 ..= 2106-02-07).

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::SmsError;

/// Smartcard / chipset serial, 1 ..= 2^53-1 (docs/format.md §1): the
/// EMM layer's own type.
pub use casd_wire::emm::DeviceId;

/// A sellable package, >= 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ProductId(u32);

impl ProductId {
    pub fn new(v: u32) -> Option<ProductId> {
        (v >= 1).then_some(ProductId(v))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for ProductId {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        ProductId::new(v).ok_or_else(|| "product_id must be >= 1".to_string())
    }
}

impl From<ProductId> for u32 {
    fn from(p: ProductId) -> u32 {
        p.0
    }
}

/// A device group (at most 256 devices), >= 1 (group_slots numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct GroupId(u32);

impl GroupId {
    pub fn new(v: u32) -> Option<GroupId> {
        (v >= 1).then_some(GroupId(v))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for GroupId {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        GroupId::new(v).ok_or_else(|| "group_id must be >= 1".to_string())
    }
}

impl From<GroupId> for u32 {
    fn from(g: GroupId) -> u32 {
        g.0
    }
}

/// The SMS's own id for a request: 1..=64 printable ASCII (0x20..=0x7E).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct TransactionId(String);

impl TransactionId {
    pub fn new(s: &str) -> Option<TransactionId> {
        let ok = (1..=64).contains(&s.len()) && s.bytes().all(|b| (0x20..=0x7E).contains(&b));
        ok.then(|| TransactionId(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Unix seconds in the wire format's u32 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnixTime(pub u32);

/// On-screen message text: non-empty UTF-8 (its byte length is checked
/// against the section size separately, see [`max_osm_text_len`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OsmText(String);

impl OsmText {
    pub fn new(s: &str) -> Option<OsmText> {
        (!s.is_empty()).then(|| OsmText(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who an OSM goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Device(DeviceId),
    Group(GroupId),
    All,
}

impl Target {
    /// Address bytes after the section header (docs/format.md §3.2).
    pub fn address_len(self) -> usize {
        use casd_wire::crypto::{ADDRESS_LEN_GLOBAL, ADDRESS_LEN_GROUP, ADDRESS_LEN_UNIQUE};
        match self {
            Target::Device(_) => ADDRESS_LEN_UNIQUE,
            Target::Group(_) => ADDRESS_LEN_GROUP,
            Target::All => ADDRESS_LEN_GLOBAL,
        }
    }
}

/// The five commands of sms-api.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandKind {
    AddDevice,
    RemoveDevice,
    AddEntitlement,
    RemoveEntitlement,
    GenerateOsm,
}

impl CommandKind {
    pub const ALL: [CommandKind; 5] = [
        CommandKind::AddDevice,
        CommandKind::RemoveDevice,
        CommandKind::AddEntitlement,
        CommandKind::RemoveEntitlement,
        CommandKind::GenerateOsm,
    ];
    /// Also the `work_items.kind`.
    pub fn name(self) -> &'static str {
        match self {
            CommandKind::AddDevice => "adddevice",
            CommandKind::RemoveDevice => "removedevice",
            CommandKind::AddEntitlement => "addentitlement",
            CommandKind::RemoveEntitlement => "removeentitlement",
            CommandKind::GenerateOsm => "generateosm",
        }
    }
    pub fn path(self) -> &'static str {
        match self {
            CommandKind::AddDevice => "/adddevice",
            CommandKind::RemoveDevice => "/removedevice",
            CommandKind::AddEntitlement => "/addentitlement",
            CommandKind::RemoveEntitlement => "/removeentitlement",
            CommandKind::GenerateOsm => "/generateosm",
        }
    }
    fn fields(self) -> &'static [&'static str] {
        match self {
            CommandKind::AddDevice | CommandKind::RemoveDevice => &["transaction_id", "device_id"],
            CommandKind::AddEntitlement => {
                &["transaction_id", "device_id", "product_id", "start", "end"]
            }
            CommandKind::RemoveEntitlement => &["transaction_id", "device_id", "product_id"],
            CommandKind::GenerateOsm => &[
                "transaction_id",
                "device_id",
                "group_id",
                "all",
                "text",
                "duration_s",
                "forced",
                "expires_at",
            ],
        }
    }
}

/// A validated SMS command (the API's edge type; the EMM wire command
/// is `emm::Command`). Its JSON (serde, tagged by `kind`) is the canonical
/// form whose SHA-256 decides idempotency: two bodies that parse to the same
/// command (field order, whitespace, a time written as RFC 3339 or as unix
/// seconds) are the same request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SmsCommand {
    AddDevice {
        device_id: DeviceId,
    },
    RemoveDevice {
        device_id: DeviceId,
    },
    AddEntitlement {
        device_id: DeviceId,
        product_id: ProductId,
        start: UnixTime,
        end: UnixTime,
    },
    RemoveEntitlement {
        device_id: DeviceId,
        product_id: ProductId,
    },
    GenerateOsm {
        target: Target,
        text: OsmText,
        duration_s: u16,
        forced: bool,
        /// As given; None means the default lifetime (see `store`).
        expires_at: Option<UnixTime>,
    },
}

impl SmsCommand {
    pub fn kind(&self) -> CommandKind {
        match self {
            SmsCommand::AddDevice { .. } => CommandKind::AddDevice,
            SmsCommand::RemoveDevice { .. } => CommandKind::RemoveDevice,
            SmsCommand::AddEntitlement { .. } => CommandKind::AddEntitlement,
            SmsCommand::RemoveEntitlement { .. } => CommandKind::RemoveEntitlement,
            SmsCommand::GenerateOsm { .. } => CommandKind::GenerateOsm,
        }
    }
    /// The device the command is about (unique OSMs included): work items
    /// of one device are processed in order.
    pub fn device_id(&self) -> Option<DeviceId> {
        match self {
            SmsCommand::AddDevice { device_id }
            | SmsCommand::RemoveDevice { device_id }
            | SmsCommand::AddEntitlement { device_id, .. }
            | SmsCommand::RemoveEntitlement { device_id, .. } => Some(*device_id),
            SmsCommand::GenerateOsm {
                target: Target::Device(d),
                ..
            } => Some(*d),
            SmsCommand::GenerateOsm { .. } => None,
        }
    }
}

/// A parsed command request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRequest {
    pub transaction_id: TransactionId,
    pub command: SmsCommand,
}

impl CommandRequest {
    /// SHA-256 of the canonical command (transaction_id excluded: it is the key).
    pub fn canonical_sha256(&self) -> [u8; 32] {
        let json = serde_json::to_vec(&self.command).unwrap_or_default();
        Sha256::digest(&json).into()
    }
}

/// The longest OSM text (UTF-8 bytes) that fits one section of
/// `max_section_bytes` for `target` (the wire crate's sizes).
pub fn max_osm_text_len(max_section_bytes: usize, target: Target) -> usize {
    casd_wire::emm::max_osm_text_len(max_section_bytes, target.address_len())
}

/// The top-level JSON object as (key, value) pairs in body order, duplicates
/// kept so that they can be refused.
struct Pairs(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Pairs, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, Value>()? {
                    v.push((k, val));
                }
                Ok(Pairs(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// The fields of one body, taken one by one; what is left is unknown.
pub struct Fields {
    map: serde_json::Map<String, Value>,
}

impl Fields {
    /// Parses the body as one JSON object. Refuses malformed JSON, anything
    /// but an object at the top, and a key given twice.
    pub fn parse(body: &[u8]) -> Result<Fields, SmsError> {
        let pairs: Pairs = serde_json::from_slice(body).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => SmsError::MalformedJson("the body must be a JSON object".into()),
                _ => SmsError::MalformedJson(format!("the body is not valid JSON: {e}")),
            }
        })?;
        let mut map = serde_json::Map::new();
        for (k, v) in pairs.0 {
            if map.contains_key(&k) {
                return Err(SmsError::DuplicateField(k));
            }
            map.insert(k, v);
        }
        Ok(Fields { map })
    }

    /// The transaction_id as far as it can be read, for the record of a
    /// refused request (a string of at most 64 characters, not validated).
    pub fn raw_transaction_id(&self) -> Option<String> {
        match self.map.get("transaction_id") {
            Some(Value::String(s)) if s.chars().count() <= 64 => Some(s.clone()),
            _ => None,
        }
    }

    fn take(&mut self, name: &'static str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn req(&mut self, name: &'static str) -> Result<Value, SmsError> {
        self.take(name).ok_or(SmsError::Missing(name))
    }

    fn integer(name: &'static str, v: &Value, max: u64) -> Result<u64, SmsError> {
        let Value::Number(n) = v else {
            return Err(SmsError::WrongType {
                field: name,
                expected: "an integer",
            });
        };
        if let Some(u) = n.as_u64() {
            if u <= max {
                return Ok(u);
            }
        } else if n.as_i64().is_none() {
            // A float: an integer written as 1e3 or 1.0, or a fraction.
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() != 0.0 || !f.is_finite() {
                return Err(SmsError::WrongType {
                    field: name,
                    expected: "an integer",
                });
            }
        }
        Err(SmsError::OutOfRange {
            field: name,
            message: format!("`{name}` must be an integer in 0..={max}"),
        })
    }

    fn device_id(&mut self, name: &'static str) -> Result<DeviceId, SmsError> {
        let v = self.req(name)?;
        let n = Self::integer(name, &v, DeviceId::MAX).map_err(|e| match e {
            SmsError::OutOfRange { field, .. } => SmsError::OutOfRange {
                field,
                message: format!("`{field}` must be an integer in 1..=9007199254740991 (2^53-1)"),
            },
            e => e,
        })?;
        DeviceId::new(n).map_err(|_| SmsError::OutOfRange {
            field: name,
            message: format!("`{name}` must be an integer in 1..=9007199254740991 (2^53-1)"),
        })
    }

    fn id_u32(&mut self, name: &'static str) -> Result<u32, SmsError> {
        let v = self.req(name)?;
        let range = || SmsError::OutOfRange {
            field: name,
            message: format!("`{name}` must be an integer in 1..=4294967295"),
        };
        let n = Self::integer(name, &v, u32::MAX as u64).map_err(|e| match e {
            SmsError::OutOfRange { .. } => range(),
            e => e,
        })?;
        if n == 0 {
            return Err(range());
        }
        Ok(n as u32)
    }

    fn time(&mut self, name: &'static str) -> Result<Option<UnixTime>, SmsError> {
        let Some(v) = self.take(name) else {
            return Ok(None);
        };
        let range = || {
            SmsError::OutOfRange {
            field: name,
            message: format!(
                "`{name}` must be between 1970-01-01T00:00:00Z and 2106-02-07T06:28:15Z (unix seconds 0..=4294967295)"
            ),
        }
        };
        match &v {
            Value::Number(_) => {
                let n = Self::integer(name, &v, u32::MAX as u64).map_err(|e| match e {
                    SmsError::OutOfRange { .. } => range(),
                    e => e,
                })?;
                Ok(Some(UnixTime(n as u32)))
            }
            Value::String(s) => {
                let t =
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| SmsError::Invalid {
                            field: name,
                            message: format!(
                                "`{name}` is not an RFC 3339 time ({e}) nor unix seconds"
                            ),
                        })?;
                let secs = t.unix_timestamp();
                u32::try_from(secs)
                    .map(|s| Some(UnixTime(s)))
                    .map_err(|_| range())
            }
            _ => Err(SmsError::WrongType {
                field: name,
                expected: "an RFC 3339 string or unix seconds",
            }),
        }
    }

    fn transaction_id(&mut self) -> Result<TransactionId, SmsError> {
        let v = self.req("transaction_id")?;
        let Value::String(s) = v else {
            return Err(SmsError::WrongType {
                field: "transaction_id",
                expected: "a string",
            });
        };
        TransactionId::new(&s).ok_or(SmsError::Invalid {
            field: "transaction_id",
            message: "`transaction_id` must be 1 to 64 printable ASCII characters".into(),
        })
    }

    fn bool_opt(&mut self, name: &'static str) -> Result<Option<bool>, SmsError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(SmsError::WrongType {
                field: name,
                expected: "true or false",
            }),
        }
    }

    /// What is left must be absent: a field of the command left untaken
    /// because it is `null` (e.g. `"device_id": null` beside `"all": true`)
    /// counts as absent, like everywhere else.
    fn finish(self) -> Result<(), SmsError> {
        match self.map.into_iter().find(|(_, v)| !v.is_null()) {
            Some((k, _)) => Err(SmsError::UnknownField(k)),
            None => Ok(()),
        }
    }
}

/// Parses and validates a command body. `max_section_bytes` bounds the OSM
/// text (422 when it cannot fit one EMM).
pub fn parse_command(
    kind: CommandKind,
    body: &[u8],
    max_section_bytes: usize,
) -> Result<CommandRequest, SmsError> {
    let mut f = Fields::parse(body)?;
    // Unknown fields first: a misspelt field explains a "missing" one.
    if let Some(k) = f.map.keys().find(|k| !kind.fields().contains(&k.as_str())) {
        return Err(SmsError::UnknownField(k.clone()));
    }
    let transaction_id = f.transaction_id()?;
    let command = match kind {
        CommandKind::AddDevice => SmsCommand::AddDevice {
            device_id: f.device_id("device_id")?,
        },
        CommandKind::RemoveDevice => SmsCommand::RemoveDevice {
            device_id: f.device_id("device_id")?,
        },
        CommandKind::AddEntitlement => add_entitlement(&mut f)?,
        CommandKind::RemoveEntitlement => SmsCommand::RemoveEntitlement {
            device_id: f.device_id("device_id")?,
            product_id: ProductId(f.id_u32("product_id")?),
        },
        CommandKind::GenerateOsm => generate_osm(&mut f, max_section_bytes)?,
    };
    f.finish()?;
    Ok(CommandRequest {
        transaction_id,
        command,
    })
}

fn add_entitlement(f: &mut Fields) -> Result<SmsCommand, SmsError> {
    let device_id = f.device_id("device_id")?;
    let product_id = ProductId(f.id_u32("product_id")?);
    let start = f.time("start")?.ok_or(SmsError::Missing("start"))?;
    let end = f.time("end")?.ok_or(SmsError::Missing("end"))?;
    if start > end {
        return Err(SmsError::StartAfterEnd);
    }
    Ok(SmsCommand::AddEntitlement {
        device_id,
        product_id,
        start,
        end,
    })
}

fn generate_osm(f: &mut Fields, max_section_bytes: usize) -> Result<SmsCommand, SmsError> {
    let target = osm_target(f)?;
    let text = match f.req("text")? {
        Value::String(s) => OsmText::new(&s).ok_or(SmsError::Invalid {
            field: "text",
            message: "`text` must not be empty".into(),
        })?,
        _ => {
            return Err(SmsError::WrongType {
                field: "text",
                expected: "a string",
            })
        }
    };
    let dv = f.req("duration_s")?;
    let duration_s = Fields::integer("duration_s", &dv, u16::MAX as u64).map_err(|e| match e {
        SmsError::OutOfRange { field, .. } => SmsError::OutOfRange {
            field,
            message: "`duration_s` must be an integer in 0..=65535 (0 = until dismissed)".into(),
        },
        e => e,
    })? as u16;
    let forced = f.bool_opt("forced")?.unwrap_or(false);
    let expires_at = f.time("expires_at")?;
    let max = max_osm_text_len(max_section_bytes, target);
    if text.as_str().len() > max {
        return Err(SmsError::OsmTooLong {
            len: text.as_str().len(),
            max,
        });
    }
    Ok(SmsCommand::GenerateOsm {
        target,
        text,
        duration_s,
        forced,
        expires_at,
    })
}

/// Exactly one of `device_id`, `group_id` or `all: true`.
fn osm_target(f: &mut Fields) -> Result<Target, SmsError> {
    let has_device = f.map.get("device_id").is_some_and(|v| !v.is_null());
    let has_group = f.map.get("group_id").is_some_and(|v| !v.is_null());
    let all = f.bool_opt("all")?.unwrap_or(false);
    match (has_device, has_group, all) {
        (true, false, false) => Ok(Target::Device(f.device_id("device_id")?)),
        (false, true, false) => Ok(Target::Group(GroupId(f.id_u32("group_id")?))),
        (false, false, true) => Ok(Target::All),
        (false, false, false) => Err(SmsError::InvalidTarget(
            "one of `device_id`, `group_id` or `all: true` is required".into(),
        )),
        _ => Err(SmsError::InvalidTarget(
            "exactly one of `device_id`, `group_id` or `all: true` may be given".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kind: CommandKind, body: &str) -> Result<CommandRequest, SmsError> {
        parse_command(kind, body.as_bytes(), 256)
    }

    fn field_of(e: SmsError) -> (u16, &'static str, Option<String>) {
        let a = crate::api_error::ApiError::from(e);
        (a.status.as_u16(), a.code, a.field)
    }

    #[test]
    fn parses_every_command() {
        let r = p(
            CommandKind::AddDevice,
            r#"{"transaction_id":"t1","device_id":42}"#,
        )
        .unwrap();
        assert_eq!(
            r.command,
            SmsCommand::AddDevice {
                device_id: DeviceId::new(42).unwrap()
            }
        );
        let r = p(
            CommandKind::AddEntitlement,
            r#"{"transaction_id":"t","device_id":1,"product_id":7,"start":"2024-01-01T00:00:00Z","end":1735689600}"#,
        )
        .unwrap();
        assert_eq!(
            r.command,
            SmsCommand::AddEntitlement {
                device_id: DeviceId::new(1).unwrap(),
                product_id: ProductId(7),
                start: UnixTime(1704067200),
                end: UnixTime(1735689600)
            }
        );
        let r = p(
            CommandKind::GenerateOsm,
            r#"{"transaction_id":"t","all":true,"text":"héllo","duration_s":0,"forced":true}"#,
        )
        .unwrap();
        assert!(matches!(
            r.command,
            SmsCommand::GenerateOsm {
                target: Target::All,
                forced: true,
                expires_at: None,
                ..
            }
        ));
        // null is absent, also for the targets not chosen.
        let r = p(
            CommandKind::GenerateOsm,
            r#"{"transaction_id":"t","all":true,"device_id":null,"group_id":null,"text":"x","duration_s":0,"expires_at":null,"forced":null}"#,
        )
        .unwrap();
        assert!(matches!(
            r.command,
            SmsCommand::GenerateOsm {
                target: Target::All,
                forced: false,
                expires_at: None,
                ..
            }
        ));
        let r = p(
            CommandKind::GenerateOsm,
            r#"{"transaction_id":"t","group_id":3,"all":false,"text":"x","duration_s":10}"#,
        )
        .unwrap();
        assert!(matches!(
            r.command,
            SmsCommand::GenerateOsm {
                target: Target::Group(GroupId(3)),
                ..
            }
        ));
    }

    #[test]
    fn canonical_form_ignores_spelling() {
        let a = p(
            CommandKind::AddEntitlement,
            r#"{"transaction_id":"t","device_id":1,"product_id":7,"start":"2024-01-01T01:00:00+01:00","end":1735689600}"#,
        )
        .unwrap();
        let b = p(
            CommandKind::AddEntitlement,
            r#"{ "end":"2025-01-01T00:00:00Z", "start":1704067200, "product_id":7, "device_id":1, "transaction_id":"other"}"#,
        )
        .unwrap();
        assert_eq!(a.canonical_sha256(), b.canonical_sha256());
        let c = p(
            CommandKind::RemoveEntitlement,
            r#"{"transaction_id":"t","device_id":1,"product_id":7}"#,
        )
        .unwrap();
        assert_ne!(a.canonical_sha256(), c.canonical_sha256());
    }

    #[test]
    fn refusals_name_the_field() {
        use CommandKind::*;
        let cases: &[(CommandKind, &str, u16, &str, Option<&str>)] = &[
            (AddDevice, "{", 400, "malformed_json", None),
            (AddDevice, "[1]", 400, "malformed_json", None),
            (
                AddDevice,
                r#"{"transaction_id":"t"}"#,
                400,
                "missing_field",
                Some("device_id"),
            ),
            (
                AddDevice,
                r#"{"device_id":1}"#,
                400,
                "missing_field",
                Some("transaction_id"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":"t","device_id":"1"}"#,
                400,
                "wrong_type",
                Some("device_id"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":"t","device_id":1.5}"#,
                400,
                "wrong_type",
                Some("device_id"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":"t","device_id":0}"#,
                400,
                "out_of_range",
                Some("device_id"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":"t","device_id":-1}"#,
                400,
                "out_of_range",
                Some("device_id"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":"t","device_id":9007199254740992}"#,
                400,
                "out_of_range",
                Some("device_id"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":"t","device_id":1e300}"#,
                400,
                "out_of_range",
                Some("device_id"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":"","device_id":1}"#,
                400,
                "invalid_field",
                Some("transaction_id"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":"é","device_id":1}"#,
                400,
                "invalid_field",
                Some("transaction_id"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":7,"device_id":1}"#,
                400,
                "wrong_type",
                Some("transaction_id"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":"t","device_id":1,"x":1}"#,
                400,
                "unknown_field",
                Some("x"),
            ),
            (
                AddDevice,
                r#"{"transaction_id":"t","device_id":1,"device_id":2}"#,
                400,
                "duplicate_field",
                Some("device_id"),
            ),
            (
                AddEntitlement,
                r#"{"transaction_id":"t","device_id":1,"product_id":0,"start":0,"end":1}"#,
                400,
                "out_of_range",
                Some("product_id"),
            ),
            (
                AddEntitlement,
                r#"{"transaction_id":"t","device_id":1,"product_id":1,"start":"yesterday","end":1}"#,
                400,
                "invalid_field",
                Some("start"),
            ),
            (
                AddEntitlement,
                r#"{"transaction_id":"t","device_id":1,"product_id":1,"start":0,"end":4294967296}"#,
                400,
                "out_of_range",
                Some("end"),
            ),
            (
                AddEntitlement,
                r#"{"transaction_id":"t","device_id":1,"product_id":1,"start":"1969-12-31T23:59:59Z","end":1}"#,
                400,
                "out_of_range",
                Some("start"),
            ),
            (
                AddEntitlement,
                r#"{"transaction_id":"t","device_id":1,"product_id":1,"start":10,"end":9}"#,
                422,
                "start_after_end",
                Some("start"),
            ),
            (
                AddEntitlement,
                r#"{"transaction_id":"t","device_id":1,"product_id":1,"start":10}"#,
                400,
                "missing_field",
                Some("end"),
            ),
            (
                GenerateOsm,
                r#"{"transaction_id":"t","text":"x","duration_s":1}"#,
                400,
                "invalid_target",
                None,
            ),
            (
                GenerateOsm,
                r#"{"transaction_id":"t","device_id":1,"all":true,"text":"x","duration_s":1}"#,
                400,
                "invalid_target",
                None,
            ),
            (
                GenerateOsm,
                r#"{"transaction_id":"t","all":"yes","text":"x","duration_s":1}"#,
                400,
                "wrong_type",
                Some("all"),
            ),
            (
                GenerateOsm,
                r#"{"transaction_id":"t","all":true,"text":"","duration_s":1}"#,
                400,
                "invalid_field",
                Some("text"),
            ),
            (
                GenerateOsm,
                r#"{"transaction_id":"t","all":true,"text":"x","duration_s":65536}"#,
                400,
                "out_of_range",
                Some("duration_s"),
            ),
            (
                GenerateOsm,
                r#"{"transaction_id":"t","all":true,"text":"x","duration_s":1,"forced":1}"#,
                400,
                "wrong_type",
                Some("forced"),
            ),
            (
                GenerateOsm,
                r#"{"transaction_id":"t","all":true,"text":"x","duration_s":1,"forcd":true}"#,
                400,
                "unknown_field",
                Some("forcd"),
            ),
        ];
        for (kind, body, status, code, field) in cases {
            let e = p(*kind, body).expect_err(body);
            let (s, c, f) = field_of(e);
            assert_eq!((s, c, f.as_deref()), (*status, *code, *field), "{body}");
        }
    }

    #[test]
    fn osm_length_bound_is_exact() {
        // 256-byte sections: global 169, unique 161, group 133 bytes of text.
        assert_eq!(max_osm_text_len(256, Target::All), 169);
        assert_eq!(
            max_osm_text_len(256, Target::Device(DeviceId::new(1).unwrap())),
            161
        );
        assert_eq!(max_osm_text_len(256, Target::Group(GroupId(1))), 133);
        let ok = format!(
            r#"{{"transaction_id":"t","all":true,"text":"{}","duration_s":1}}"#,
            "a".repeat(169)
        );
        assert!(p(CommandKind::GenerateOsm, &ok).is_ok());
        let long = format!(
            r#"{{"transaction_id":"t","all":true,"text":"{}","duration_s":1}}"#,
            "a".repeat(170)
        );
        assert_eq!(
            field_of(p(CommandKind::GenerateOsm, &long).unwrap_err()).1,
            "osm_too_long"
        );
        // Multi-byte characters count in bytes.
        let utf = format!(
            r#"{{"transaction_id":"t","all":true,"text":"{}","duration_s":1}}"#,
            "é".repeat(85)
        );
        assert_eq!(
            field_of(p(CommandKind::GenerateOsm, &utf).unwrap_err()).1,
            "osm_too_long"
        );
    }
}
