//! The work item payload: what the SMS-CAS interface hands the EMMG in
//! `work_items.payload` (JSON, tagged by `kind`, which is also
//! `work_items.kind`). It is the validated command plus what the
//! interface decided while committing it (the slot given, the OSM's
//! not_after); state the EMMG must send *as it is when the EMM is made*
//! (the entitlement set, key versions) is read by the EMMG itself.

use serde::{Deserialize, Serialize};

use crate::sms::types::{DeviceId, ProductId, Target};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Work {
    AddDevice {
        device_id: DeviceId,
        group_id: u32,
        slot: u8,
        pmk_version: u32,
        /// The device existed (disabled) and was enabled again.
        reenabled: bool,
        /// A bulk command (import, `POST /bulk`): its EMMs go in the
        /// background class (the item is also paced, see [`super::BulkPace`]).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        bulk: bool,
    },
    RemoveDevice {
        device_id: DeviceId,
        /// The slot it held (now freed).
        group_id: Option<u32>,
        slot: Option<u8>,
    },
    AddEntitlement {
        device_id: DeviceId,
        product_id: ProductId,
        start: u32,
        end: u32,
        /// As `AddDevice::bulk`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        bulk: bool,
    },
    RemoveEntitlement {
        device_id: DeviceId,
        product_id: ProductId,
        /// False when the device held no active entitlement for it (the
        /// ENTITLEMENT_REMOVE is sent anyway: a receiver may hold a stale one).
        was_active: bool,
    },
    GenerateOsm {
        target: Target,
        text: String,
        duration_s: u16,
        forced: bool,
        /// expires_at as given, or the default lifetime from acceptance.
        not_after: u32,
    },
    /// Send the device its group's current and pending GK and the current
    /// and pending GLK, in a unique EMM of the background class (purpose
    /// `keys`, replacing its previous one). Rotations before group-addressed
    /// delivery enqueued one per device; kept so that such items still
    /// queued are processed.
    DeliverKeys { device_id: DeviceId },
    /// Scheduler (rotation, revocation): one group EMM to the group's
    /// current members, sealed under the group's GK in force when it is
    /// made, carrying the named versions: GROUP_KEY of this group and/or
    /// GLOBAL_KEY (background class, purpose `keys`, live until `not_after`).
    DeliverGroupKeys {
        group_id: u32,
        gk: Option<KeyOffer>,
        glk: Option<KeyOffer>,
        not_after: u32,
    },
    /// Scheduler (refresh): send the device its ENTITLEMENT_SET again, as
    /// it is when the EMM is made (background class).
    RefreshSet { device_id: DeviceId },
}

/// A key version to deliver, by number (the Encryptor fills in the key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyOffer {
    pub version: u32,
    pub activates_at: u32,
}

impl Work {
    pub fn kind(&self) -> &'static str {
        match self {
            Work::AddDevice { .. } => "adddevice",
            Work::RemoveDevice { .. } => "removedevice",
            Work::AddEntitlement { .. } => "addentitlement",
            Work::RemoveEntitlement { .. } => "removeentitlement",
            Work::GenerateOsm { .. } => "generateosm",
            Work::DeliverKeys { .. } => "deliverkeys",
            Work::DeliverGroupKeys { .. } => "delivergroupkeys",
            Work::RefreshSet { .. } => "refreshset",
        }
    }
    /// The same work as a bulk command: the adds' EMMs go in the background
    /// class. Removals keep theirs (a disable is urgent however it came).
    pub fn into_bulk(mut self) -> Work {
        if let Work::AddDevice { bulk, .. } | Work::AddEntitlement { bulk, .. } = &mut self {
            *bulk = true;
        }
        self
    }

    /// Whether the EMMs go in the background class ([`Work::into_bulk`]).
    pub fn is_bulk(&self) -> bool {
        matches!(
            self,
            Work::AddDevice { bulk: true, .. } | Work::AddEntitlement { bulk: true, .. }
        )
    }

    /// The `work_items.device_id` column: the device whose items must be
    /// processed in order. `None` for the Scheduler's kinds: they read the
    /// device's state when their EMM is made (under a shared lock on its
    /// row), so order does not matter, and a delivery scheduled for later
    /// (`not_before`) must not hold up the device's SMS commands.
    pub fn device_id(&self) -> Option<DeviceId> {
        match self {
            Work::AddDevice { device_id, .. }
            | Work::RemoveDevice { device_id, .. }
            | Work::AddEntitlement { device_id, .. }
            | Work::RemoveEntitlement { device_id, .. } => Some(*device_id),
            Work::GenerateOsm {
                target: Target::Device(d),
                ..
            } => Some(*d),
            Work::GenerateOsm { .. }
            | Work::DeliverKeys { .. }
            | Work::DeliverGroupKeys { .. }
            | Work::RefreshSet { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_is_the_payload_tag() {
        let w = Work::RefreshSet {
            device_id: DeviceId::new(3).unwrap(),
        };
        let v = serde_json::to_value(&w).unwrap();
        assert_eq!(v["kind"], w.kind());
        assert_eq!(w.kind(), "refreshset");
    }
}
