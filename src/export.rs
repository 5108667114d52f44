//! Personalization exports (docs/format.md §9): which devices an export
//! covers ([`DeviceSet`], parsed at the edge), and the `duk_exports` table
//! (this module is its only writer): who exported which devices, when,
//! under which transport key. The wrapping itself is the Encryptor's
//! ([`crate::encryptor::Encryptor::export_duks`]); this module holds no key.

use mysql_async::prelude::*;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::db::{Db, DbError};
use casd_wire::emm::DeviceId;

/// Most devices one export may hold (a file of about 100 MB).
pub const MAX_DEVICES: u64 = 1_000_000;

/// Devices as sorted, disjoint, non-adjacent inclusive ranges; written
/// and parsed as `"1-1000,5000,7000-7010"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceSet(Vec<(u64, u64)>);

impl DeviceSet {
    /// From ranges in any order (overlaps merged); refuses an empty set,
    /// a device id out of range and more than [`MAX_DEVICES`].
    pub fn new(mut ranges: Vec<(u64, u64)>) -> Result<DeviceSet, String> {
        for &(a, b) in &ranges {
            if a > b {
                return Err(format!("range {a}-{b} is backwards"));
            }
            for id in [a, b] {
                DeviceId::new(id).map_err(|_| format!("device id {id} is not in 1..=2^53-1"))?;
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let set = DeviceSet(merged);
        match set.len() {
            0 => Err("no devices given".into()),
            n if n > MAX_DEVICES => Err(format!("{n} devices: at most {MAX_DEVICES} per export")),
            _ => Ok(set),
        }
    }

    /// The set of `ids` (valid ids, at least one: never empty).
    pub fn of(ids: &[DeviceId]) -> DeviceSet {
        let mut ranges: Vec<(u64, u64)> = ids.iter().map(|d| (d.get(), d.get())).collect();
        ranges.sort_unstable();
        ranges.dedup();
        DeviceSet::new(ranges).unwrap_or(DeviceSet(Vec::new()))
    }

    /// Number of devices.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a + 1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every device, ascending.
    pub fn iter(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.0
            .iter()
            .flat_map(|&(a, b)| a..=b)
            .filter_map(|d| DeviceId::new(d).ok())
    }
}

impl std::str::FromStr for DeviceSet {
    type Err = String;
    fn from_str(s: &str) -> Result<DeviceSet, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|_| format!("`{}` is not a device id", t.trim()))
        };
        let ranges = s
            .split([',', '\n'])
            .filter(|t| !t.trim().is_empty())
            .map(|t| match t.split_once('-') {
                Some((a, b)) => Ok((num(a)?, num(b)?)),
                None => num(t).map(|a| (a, a)),
            })
            .collect::<Result<Vec<_>, String>>()?;
        DeviceSet::new(ranges)
    }
}

impl TryFrom<String> for DeviceSet {
    type Error = String;
    fn try_from(s: String) -> Result<DeviceSet, String> {
        s.parse()
    }
}

impl From<DeviceSet> for String {
    fn from(d: DeviceSet) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (a, b)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            match a == b {
                true => write!(f, "{sep}{a}")?,
                false => write!(f, "{sep}{a}-{b}")?,
            }
        }
        Ok(())
    }
}

/// How the export was asked for (`duk_exports.via`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// `casd keys export` on the appliance, with the root key file.
    Cli,
    /// `POST /encryptor/v1/export`, scope `admin`.
    Api,
}

/// One export as recorded (no key material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub exported_by: String,
    pub via: Via,
    pub pmk_version: u32,
    pub transport_key_id: String,
    pub devices: DeviceSet,
}

/// Records an export (autocommit) and logs it; returns its id.
pub async fn record(db: &Db, r: &Record, at: OffsetDateTime) -> Result<u64, DbError> {
    let mut conn = db.conn().await?;
    let via = match r.via {
        Via::Cli => "cli",
        Via::Api => "api",
    };
    conn.exec_drop(
        "INSERT INTO duk_exports (exported_by, via, exported_at, pmk_version, transport_key_id, \
         device_count, devices) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            &r.exported_by,
            via,
            crate::sms::store::db_time(at),
            r.pmk_version,
            &r.transport_key_id,
            r.devices.len(),
            r.devices.to_string(),
        ),
    )
    .await?;
    let id = conn.last_insert_id().unwrap_or(0);
    tracing::info!(
        export_id = id,
        exported_by = %r.exported_by,
        via,
        pmk_version = r.pmk_version,
        transport_key_id = %r.transport_key_id,
        device_count = r.devices.len(),
        devices = %r.devices,
        "personalization export"
    );
    Ok(id)
}

/// The recorded exports, newest first: (id, exported_by, via, exported_at
/// RFC 3339, device_count, devices).
pub async fn list(
    db: &Db,
    limit: u32,
) -> Result<Vec<(u64, String, String, String, u64, String)>, DbError> {
    let mut conn = db.conn().await?;
    let rows = conn
        .exec(
            format!(
                "SELECT id, exported_by, via, DATE_FORMAT(exported_at, '{}'), device_count, devices \
                 FROM duk_exports ORDER BY id DESC LIMIT ?",
                crate::sms::store::RFC3339_SQL
            ),
            (limit,),
        )
        .await?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_sets_merge_and_print_as_ranges() {
        let s: DeviceSet = "7, 1-3,4 ,10-12,11".parse().unwrap();
        assert_eq!(s.to_string(), "1-4,7,10-12");
        assert_eq!(s.len(), 8);
        assert_eq!(
            s.iter().map(|d| d.get()).collect::<Vec<_>>(),
            [1, 2, 3, 4, 7, 10, 11, 12]
        );
        assert!("".parse::<DeviceSet>().is_err());
        assert!("0".parse::<DeviceSet>().is_err());
        assert!("5-3".parse::<DeviceSet>().is_err());
        assert!("1-2000000".parse::<DeviceSet>().is_err());
        assert!("x".parse::<DeviceSet>().is_err());
    }
}
