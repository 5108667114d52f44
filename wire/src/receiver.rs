//! A reference receiver: what a set-top box / smartcard does with the EMM
//! sections it filters from the air, written from the contract (docs/format.md §1–§5) alone.
//!
//! It holds only what a device holds: its device_id and DUK (burned in at
//! manufacture), and whatever keys and rights the headend delivered to it
//! over the air. Tests use it to prove end to end that what the SMS asked for
//! is what a device ends up with; `casd-probe` can use it to decode as a
//! given device. Pure: no I/O, no clock (the caller passes `now`).
//!
//! Order of checks, as the contract requires: section filter on table_id and
//! address, CRC, MAC (constant time), then decrypt; nothing of a section
//! that fails a check is used.
//!
//! Keys: GROUP_KEY and GLOBAL_KEY arrive in unique EMMs (to one device,
//! under its DUK) and, for a group-addressed rotation, in group EMMs (under
//! the group's current GK): a group EMM's GROUP_KEY must name the EMM's own
//! group (`emm::open_emm` refuses it otherwise) and its slot is ignored, the
//! device keeping the slot its unique EMMs gave it.
//!
//! Newest wins: the carousel repeats EMMs and a receiver may tune in at any
//! point of a cycle, so an older EMM can arrive after a newer one. emm_ids
//! increase, so for each product (and for the enable state) a command is
//! applied only if its emm_id is newer than the one that last changed it;
//! an ENTITLEMENT_SET applies to every product it is newer for.

use std::collections::{BTreeMap, HashMap};

use crate::crypto::Key128;
use crate::emm::{self, Address, Command, Entitlement};

/// What happened to one section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not addressed to this device (filtered out, not an error).
    NotForMe,
    /// For this device, but we lack the key (e.g. a GK version not yet delivered).
    MissingKey { table_id: u8, key_version: u32 },
    /// Failed CRC / MAC / decoding: ignored.
    Rejected(String),
    /// Past its not_after at `now`: dropped unread.
    Expired { emm_id: u64 },
    /// Already applied (the carousel repeats every EMM).
    Repeat { emm_id: u64 },
    /// Applied.
    Applied { emm_id: u64, commands: usize },
}

/// An on-screen message received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Osm {
    pub emm_id: u64,
    pub duration_s: u16,
    pub forced: bool,
    pub text: String,
}

/// One device's view of the air.
#[derive(Debug)]
pub struct Receiver {
    pub device_id: u64,
    duk: Key128,
    /// (group_id, slot) learned from GROUP_KEY commands.
    pub group: Option<(u32, u8)>,
    group_keys: HashMap<(u32, u32), (Key128, u32)>,
    global_keys: HashMap<u32, (Key128, u32)>,
    pub enabled: Option<bool>,
    enabled_by: u64,
    /// product_id → (start, end).
    pub entitlements: BTreeMap<u32, (u32, u32)>,
    /// product_id → emm_id that last changed it (removals included).
    changed_by: HashMap<u32, u64>,
    /// emm_id of the newest ENTITLEMENT_SET / DEVICE_DISABLE applied.
    set_by: u64,
    pub osms: Vec<Osm>,
    seen: std::collections::HashSet<u64>,
}

impl Receiver {
    pub fn new(device_id: u64, duk: Key128) -> Self {
        Receiver {
            device_id,
            duk,
            group: None,
            group_keys: HashMap::new(),
            global_keys: HashMap::new(),
            enabled: None,
            enabled_by: 0,
            entitlements: BTreeMap::new(),
            changed_by: HashMap::new(),
            set_by: 0,
            osms: Vec::new(),
            seen: Default::default(),
        }
    }

    /// GK versions held for our group (version, activates_at).
    pub fn group_key_versions(&self) -> Vec<(u32, u32)> {
        let mut v: Vec<(u32, u32)> = self
            .group_keys
            .iter()
            .map(|((_, ver), (_, at))| (*ver, *at))
            .collect();
        v.sort();
        v
    }

    /// GLK versions held (version, activates_at).
    pub fn global_key_versions(&self) -> Vec<(u32, u32)> {
        let mut v: Vec<(u32, u32)> = self
            .global_keys
            .iter()
            .map(|(ver, (_, at))| (*ver, *at))
            .collect();
        v.sort();
        v
    }

    /// Filters, checks, opens and applies one section.
    pub fn accept(&mut self, section: &[u8], now: u32) -> Outcome {
        let view = match crate::crypto::parse_section(section) {
            Ok(v) => v,
            Err(e) => return Outcome::Rejected(e.to_string()),
        };
        let address = match Address::from_wire(view.table_id, view.address) {
            Ok(a) => a,
            Err(e) => return Outcome::Rejected(e.to_string()),
        };
        let key = match &address {
            Address::Unique { device_id } => {
                if device_id.get() != self.device_id {
                    return Outcome::NotForMe;
                }
                &self.duk
            }
            Address::Group { group_id, bitmap } => {
                let Some((g, slot)) = self.group else {
                    return Outcome::NotForMe;
                };
                if *group_id != g || !emm::bitmap_has_slot(bitmap, slot) {
                    return Outcome::NotForMe;
                }
                match self.group_keys.get(&(g, view.key_version)) {
                    Some((k, _)) => k,
                    None => {
                        return Outcome::MissingKey {
                            table_id: view.table_id,
                            key_version: view.key_version,
                        }
                    }
                }
            }
            Address::Global => match self.global_keys.get(&view.key_version) {
                Some((k, _)) => k,
                None => {
                    return Outcome::MissingKey {
                        table_id: view.table_id,
                        key_version: view.key_version,
                    }
                }
            },
        };
        let opened = match emm::open_emm(section, key) {
            Ok(o) => o,
            Err(e) => return Outcome::Rejected(e.to_string()),
        };
        let id = opened.emm_id.0;
        if opened.not_after < now {
            return Outcome::Expired { emm_id: id };
        }
        if !self.seen.insert(id) {
            return Outcome::Repeat { emm_id: id };
        }
        let n = opened.commands.len();
        let unique = address.is_unique();
        for c in opened.commands {
            self.apply(id, c, unique);
        }
        Outcome::Applied {
            emm_id: id,
            commands: n,
        }
    }

    /// True (and recorded) when `emm_id` is newer than what last changed `product`.
    fn newer_for(&mut self, product: u32, emm_id: u64) -> bool {
        let last = self
            .changed_by
            .get(&product)
            .copied()
            .unwrap_or(0)
            .max(self.set_by);
        if emm_id > last {
            self.changed_by.insert(product, emm_id);
            true
        } else {
            false
        }
    }

    /// Applies one command of EMM `emm_id` (`unique`: addressed to this
    /// device alone, which alone may say its slot).
    fn apply(&mut self, emm_id: u64, c: Command, unique: bool) {
        match c {
            Command::EntitlementAdd(Entitlement {
                product_id,
                start,
                end,
            }) => {
                if self.newer_for(product_id, emm_id) {
                    self.entitlements.insert(product_id, (start, end));
                }
            }
            Command::EntitlementRemove { product_id } => {
                if self.newer_for(product_id, emm_id) {
                    self.entitlements.remove(&product_id);
                }
            }
            Command::DeviceEnable => {
                if emm_id > self.enabled_by {
                    self.enabled = Some(true);
                    self.enabled_by = emm_id;
                }
            }
            Command::DeviceDisable => self.disable(emm_id),
            Command::Osm {
                duration_s,
                flags,
                text,
            } => self.osms.push(Osm {
                emm_id,
                duration_s,
                forced: flags & emm::OSM_FLAG_FORCED != 0,
                text,
            }),
            Command::GroupKey {
                group_id,
                slot,
                key_version,
                activates_at,
                key,
            } => {
                if unique {
                    self.group = Some((group_id, slot));
                }
                self.group_keys
                    .insert((group_id, key_version), (key, activates_at));
            }
            Command::GlobalKey {
                key_version,
                activates_at,
                key,
            } => {
                self.global_keys.insert(key_version, (key, activates_at));
            }
            Command::EntitlementSet { entries } => self.set_entitlements(emm_id, entries),
            Command::Unknown { .. } => {}
        }
    }

    /// DEVICE_DISABLE: disabled, and its entitlements gone, unless newer
    /// commands said otherwise.
    fn disable(&mut self, emm_id: u64) {
        if emm_id > self.enabled_by {
            self.enabled = Some(false);
            self.enabled_by = emm_id;
        }
        if emm_id > self.set_by {
            self.set_by = emm_id;
            self.entitlements.clear();
        }
    }

    /// ENTITLEMENT_SET: the whole set, except products changed by a newer
    /// single command, which keep that state.
    fn set_entitlements(&mut self, emm_id: u64, set: Vec<Entitlement>) {
        let changed_by = &self.changed_by;
        self.entitlements
            .retain(|p, _| changed_by.get(p).is_some_and(|by| *by > emm_id));
        for e in set {
            if self
                .changed_by
                .get(&e.product_id)
                .is_none_or(|by| *by < emm_id)
            {
                self.entitlements.insert(e.product_id, (e.start, e.end));
            }
        }
        for by in self.changed_by.values_mut() {
            if *by < emm_id {
                *by = emm_id;
            }
        }
        self.set_by = self.set_by.max(emm_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::derive_duk;
    use crate::emm::{seal_emm, DeviceId, EmmId, SealInput};

    const NOW: u32 = 1_700_000_000;

    fn seal(
        id: u64,
        address: Address,
        key: &Key128,
        version: u32,
        commands: Vec<Command>,
    ) -> Vec<u8> {
        let input = SealInput {
            emm_id: EmmId(id),
            issued_at: NOW,
            not_after: NOW + 3600,
            address,
            key_version: version,
            commands,
        };
        seal_emm(&input, key, 256, &mut rand::thread_rng()).unwrap()
    }

    fn unique(dev: u64) -> Address {
        Address::Unique {
            device_id: DeviceId::new(dev).unwrap(),
        }
    }

    fn ent(p: u32) -> Command {
        Command::EntitlementAdd(Entitlement {
            product_id: p,
            start: 1,
            end: 2,
        })
    }

    #[test]
    fn filters_checks_and_applies() {
        let pmk = Key128::from_bytes([1; 16]);
        let mut r = Receiver::new(7, derive_duk(&pmk, 7));
        let other = seal(
            1,
            unique(8),
            &derive_duk(&pmk, 8),
            1,
            vec![Command::DeviceEnable],
        );
        assert_eq!(r.accept(&other, NOW), Outcome::NotForMe);
        let mine = seal(
            2,
            unique(7),
            &derive_duk(&pmk, 7),
            1,
            vec![Command::DeviceEnable, ent(5)],
        );
        assert_eq!(
            r.accept(&mine, NOW),
            Outcome::Applied {
                emm_id: 2,
                commands: 2
            }
        );
        assert_eq!(r.accept(&mine, NOW), Outcome::Repeat { emm_id: 2 });
        assert_eq!(r.enabled, Some(true));
        assert_eq!(r.entitlements.get(&5), Some(&(1, 2)));
        let mut bad = mine.clone();
        bad[30] ^= 1;
        assert!(matches!(r.accept(&bad, NOW), Outcome::Rejected(_)));
        assert_eq!(r.accept(&mine, NOW + 7200), Outcome::Expired { emm_id: 2 });
    }

    #[test]
    fn group_and_global_need_delivered_keys() {
        let pmk = Key128::from_bytes([1; 16]);
        let gk = Key128::from_bytes([2; 16]);
        let glk = Key128::from_bytes([3; 16]);
        let mut r = Receiver::new(7, derive_duk(&pmk, 7));
        let g = seal(10, Address::group_with_slots(4, [3]), &gk, 1, vec![ent(9)]);
        let gl = seal(11, Address::Global, &glk, 2, vec![Command::DeviceEnable]);
        assert_eq!(
            r.accept(&g, NOW),
            Outcome::NotForMe,
            "group unknown before GROUP_KEY"
        );
        let keys = seal(
            12,
            unique(7),
            &derive_duk(&pmk, 7),
            1,
            vec![
                Command::GroupKey {
                    group_id: 4,
                    slot: 3,
                    key_version: 1,
                    activates_at: 0,
                    key: gk.clone(),
                },
                Command::GlobalKey {
                    key_version: 2,
                    activates_at: 0,
                    key: glk.clone(),
                },
            ],
        );
        assert!(matches!(
            r.accept(&gl, NOW),
            Outcome::MissingKey { key_version: 2, .. }
        ));
        assert!(matches!(r.accept(&keys, NOW), Outcome::Applied { .. }));
        assert_eq!(
            r.accept(&g, NOW),
            Outcome::Applied {
                emm_id: 10,
                commands: 1
            }
        );
        assert_eq!(
            r.accept(&gl, NOW),
            Outcome::Applied {
                emm_id: 11,
                commands: 1
            }
        );
        let other_slot = seal(13, Address::group_with_slots(4, [2]), &gk, 1, vec![ent(9)]);
        assert_eq!(r.accept(&other_slot, NOW), Outcome::NotForMe);
        assert_eq!(r.group_key_versions(), vec![(1, 0)]);
    }

    #[test]
    fn a_group_addressed_rotation_is_followed() {
        let pmk = Key128::from_bytes([1; 16]);
        let (gk1, gk2, glk2) = (
            Key128::from_bytes([2; 16]),
            Key128::from_bytes([4; 16]),
            Key128::from_bytes([5; 16]),
        );
        let duk = derive_duk(&pmk, 7);
        let mut r = Receiver::new(7, duk.clone());
        let gk = |version, slot, key: &Key128| Command::GroupKey {
            group_id: 4,
            slot,
            key_version: version,
            activates_at: 0,
            key: key.clone(),
        };
        let first = seal(1, unique(7), &duk, 1, vec![gk(1, 3, &gk1)]);
        assert!(matches!(r.accept(&first, NOW), Outcome::Applied { .. }));
        // One group EMM under GK_1 for the whole group (slot 0 written).
        let rotation = seal(
            2,
            Address::group_with_slots(4, [0, 3, 9]),
            &gk1,
            1,
            vec![
                gk(2, 0, &gk2),
                Command::GlobalKey {
                    key_version: 2,
                    activates_at: 0,
                    key: glk2.clone(),
                },
            ],
        );
        assert!(matches!(r.accept(&rotation, NOW), Outcome::Applied { .. }));
        assert_eq!(r.group, Some((4, 3)), "a group EMM never moves the slot");
        assert_eq!(r.group_key_versions(), vec![(1, 0), (2, 0)]);
        assert_eq!(r.global_key_versions(), vec![(2, 0)]);
        let g = seal(3, Address::group_with_slots(4, [3]), &gk2, 2, vec![ent(9)]);
        let gl = seal(4, Address::Global, &glk2, 2, vec![ent(8)]);
        assert!(matches!(r.accept(&g, NOW), Outcome::Applied { .. }));
        assert!(matches!(r.accept(&gl, NOW), Outcome::Applied { .. }));
        assert_eq!(
            r.entitlements.keys().copied().collect::<Vec<_>>(),
            vec![8, 9]
        );
    }

    #[test]
    fn newest_emm_wins_whatever_the_arrival_order() {
        let pmk = Key128::from_bytes([1; 16]);
        let duk = derive_duk(&pmk, 7);
        let mut r = Receiver::new(7, duk.clone());
        let add5 = seal(5, unique(7), &duk, 1, vec![ent(1)]);
        let remove7 = seal(
            7,
            unique(7),
            &duk,
            1,
            vec![Command::EntitlementRemove { product_id: 1 }],
        );
        let set3 = seal(
            3,
            unique(7),
            &duk,
            1,
            vec![Command::EntitlementSet { entries: vec![] }],
        );
        let add8 = seal(8, unique(7), &duk, 1, vec![ent(2)]);
        let set9 = seal(
            9,
            unique(7),
            &duk,
            1,
            vec![Command::EntitlementSet {
                entries: vec![Entitlement {
                    product_id: 3,
                    start: 1,
                    end: 2,
                }],
            }],
        );
        r.accept(&remove7, NOW);
        r.accept(&add5, NOW); // older: must not bring product 1 back
        r.accept(&add8, NOW);
        r.accept(&set3, NOW); // older than add8: product 2 stays
        assert_eq!(r.entitlements.keys().copied().collect::<Vec<_>>(), vec![2]);
        r.accept(&set9, NOW); // newest: the whole set
        assert_eq!(r.entitlements.keys().copied().collect::<Vec<_>>(), vec![3]);
    }
}
