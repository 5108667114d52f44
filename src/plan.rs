//! Carousel planning (`casd plan`, and the same figures as metrics): from
//! the live carousel (the `emms` table's live EMMs, what every Cycler
//! plays) and the configuration, the air time of one pass per class at
//! each output's bitrate, and the air time an import of N devices, a
//! group-addressed key rotation or a revocation will take. Operators size
//! their EMM bandwidth with it (`docs/operations.md`, "Sizing EMM
//! bandwidth").
//!
//! Air time is section bytes × 8 × 188 / 184 (TS headers; sections are
//! packed back to back) / bitrate: what the output needs to send them
//! once. A new EMM is first sent `cycler.burst_count` times in the fast
//! lane, then once per pass; every class plays once per pass, so a pass
//! is every class's cycle.

use carousel::Class;
use mysql_async::prelude::*;
use serde::Serialize;

use crate::config::Config;
use crate::scheduler::rotation::{airtime_s, group_key_emm_bytes, key_emm_bytes};
use casd_wire::emm::{self, Address, DeviceId, TLV_HEADER_LEN};

/// Devices per group (the group bitmap's 256 slots).
pub const GROUP_SIZE: u64 = 256;

/// What the live carousel holds, per class (index = `Class as usize`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Live {
    pub emms: [u64; 3],
    pub bytes: [u64; 3],
    /// Groups with members and enabled devices.
    pub groups: u64,
    pub devices: u64,
}

/// Reads the live carousel's counts (no EMM body is read).
pub async fn read_live<Q: Queryable>(q: &mut Q) -> Result<Live, mysql_async::Error> {
    let rows: Vec<(u8, u64, u64)> = q
        .query(
            "SELECT class, COUNT(*), CAST(SUM(LENGTH(encrypted_emm)) AS UNSIGNED) FROM emms \
             WHERE state = 'live' AND not_after > UTC_TIMESTAMP(6) GROUP BY class",
        )
        .await?;
    let mut live = Live::default();
    for (class, n, bytes) in rows {
        if let Some(c) = Class::from_u8(class) {
            live.emms[c as usize] = n;
            live.bytes[c as usize] = bytes;
        }
    }
    let (groups, devices): (u64, u64) = q
        .query_first(
            "SELECT (SELECT COUNT(DISTINCT group_id) FROM group_slots WHERE device_id IS NOT NULL), \
             (SELECT COUNT(*) FROM devices WHERE state = 'enabled')",
        )
        .await?
        .unwrap_or((0, 0));
    live.groups = groups;
    live.devices = devices;
    Ok(live)
}

/// What the plan is asked about besides the live carousel.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Ask {
    /// Devices of an import (adddevice each, `products` entitlements).
    pub import_devices: u64,
    pub products: u32,
    /// Devices a rotation is planned for (`None`: the enabled devices now).
    pub rotation_devices: Option<u64>,
}

/// One class at one output.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassPlan {
    pub class: &'static str,
    pub emms: u64,
    pub bytes: u64,
    /// The class's share of a pass.
    pub air_s: f64,
    /// A pass: every class once (the class's cycle time).
    pub cycle_s: f64,
    /// `cycler.cycle_target_<class>_s`.
    pub target_s: f64,
}

/// One output's plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutputPlan {
    pub output: String,
    pub bitrate: u64,
    pub classes: Vec<ClassPlan>,
    /// Group-addressed GK + GLK rotation: one group EMM per group.
    pub rotation_groups: u64,
    pub rotation_once_s: f64,
    /// Its first sending (burst_count times in the fast lane).
    pub rotation_first_send_s: f64,
    /// One removal: unique GK EMMs to the 255 others of a full group, then
    /// a GLK rotation (with `glk_rotation_removals = 1`).
    pub revocation_s: f64,
    /// An import: its EMMs' first sending, and what it adds to each pass.
    pub import_devices: u64,
    pub import_first_send_s: f64,
    pub import_adds_to_cycle_s: f64,
}

/// Bytes of one adddevice's EMMs: DEVICE_ENABLE + one GK + one GLK, and
/// the ENTITLEMENT_SET of `products` entitlements.
pub fn adddevice_bytes(products: u32) -> u64 {
    let a = Address::Unique {
        device_id: DeviceId::new(1).expect("1 is a device id"),
    };
    let enable = key_emm_bytes(&a, 1) + TLV_HEADER_LEN;
    let set = a.emm_overhead() + TLV_HEADER_LEN + emm::entitlement_set_value_len(products as usize);
    (enable + set) as u64
}

/// The plan of every output (pure).
pub fn plan(cfg: &Config, live: &Live, ask: Ask) -> Vec<OutputPlan> {
    let burst = f64::from(cfg.cycler.burst_count.max(1));
    let targets = cfg.cycler.cycle_targets_s();
    let groups = ask
        .rotation_devices
        .map_or(live.groups, |d| d.div_ceil(GROUP_SIZE));
    let unique_keys = key_emm_bytes(
        &Address::Unique {
            device_id: DeviceId::new(1).expect("1 is a device id"),
        },
        1,
    );
    let total: u64 = live.bytes.iter().sum();
    cfg.cycler
        .outputs
        .iter()
        .map(|o| {
            let air = |n: u64, bytes: usize| airtime_s(n, bytes, o.bitrate);
            let cycle_s = air(total, 1);
            let classes = Class::ALL
                .iter()
                .map(|&c| ClassPlan {
                    class: class_name(c),
                    emms: live.emms[c as usize],
                    bytes: live.bytes[c as usize],
                    air_s: air(live.bytes[c as usize], 1),
                    cycle_s,
                    target_s: targets[c as usize],
                })
                .collect();
            let rotation_once_s = air(groups, group_key_emm_bytes());
            let import = ask.import_devices * adddevice_bytes(ask.products);
            OutputPlan {
                output: o.name.clone(),
                bitrate: o.bitrate,
                classes,
                rotation_groups: groups,
                rotation_once_s,
                rotation_first_send_s: rotation_once_s * burst,
                revocation_s: (air(GROUP_SIZE - 1, unique_keys) + rotation_once_s) * burst,
                import_devices: ask.import_devices,
                import_first_send_s: air(import, 1) * burst,
                import_adds_to_cycle_s: air(import, 1),
            }
        })
        .collect()
}

pub fn class_name(c: Class) -> &'static str {
    match c {
        Class::Urgent => "urgent",
        Class::Change => "change",
        Class::Background => "background",
    }
}

/// The plan as text, one block per output.
pub fn render(plans: &[OutputPlan], live: &Live) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "live carousel: {} EMMs, {} bytes; {} enabled devices in {} groups",
        live.emms.iter().sum::<u64>(),
        live.bytes.iter().sum::<u64>(),
        live.devices,
        live.groups
    );
    for p in plans {
        let _ = writeln!(s, "\noutput {} at {} bit/s", p.output, p.bitrate);
        for c in &p.classes {
            let _ = writeln!(
                s,
                "  {:<10} {:>9} EMMs {:>12} bytes  {:>9.1} s of air; cycle (pass) {:.1} s, target {:.0} s",
                c.class, c.emms, c.bytes, c.air_s, c.cycle_s, c.target_s
            );
        }
        let _ = writeln!(
            s,
            "  rotation   {} groups: one pass {:.1} s, first sending {:.1} s",
            p.rotation_groups, p.rotation_once_s, p.rotation_first_send_s
        );
        let _ = writeln!(
            s,
            "  revocation one removal (255 group-mates + GLK to every group): {:.1} s",
            p.revocation_s
        );
        let _ = writeln!(
            s,
            "  import     {} devices: first sending {:.1} s, then +{:.1} s per pass",
            p.import_devices, p.import_first_send_s, p.import_adds_to_cycle_s
        );
    }
    s
}

/// `casd_plan_*` gauges from the live carousel every 10 s (the Scheduler
/// role's process; `docs/metrics.md`).
pub fn watch(shared: &crate::app::Shared) {
    let m = &shared.metrics;
    if !m.is_on() {
        return;
    }
    let cfg = shared.cfg.clone();
    let outputs = cfg.cycler.outputs.iter().map(|o| o.name.clone());
    let handles: Vec<(Vec<metrics::Gauge>, [metrics::Gauge; 3])> =
        outputs.map(|name| plan_gauges(m, &name)).collect();
    let db = shared.db.clone();
    let every = std::time::Duration::from_secs(10);
    crate::metrics::every(every, shared.shutdown.clone(), move || {
        let (db, cfg, handles) = (db.clone(), cfg.clone(), handles.clone());
        async move {
            let Ok(mut c) = db.conn().await else { return };
            let Ok(live) = read_live(&mut c).await else {
                return;
            };
            let ask = Ask {
                import_devices: 1000,
                products: 1,
                rotation_devices: None,
            };
            for (p, (cycle, once)) in plan(&cfg, &live, ask).iter().zip(&handles) {
                for (g, c) in cycle.iter().zip(&p.classes) {
                    g.set(c.cycle_s);
                }
                once[0].set(p.rotation_once_s);
                once[1].set(p.revocation_s);
                once[2].set(p.import_first_send_s);
            }
        }
    });
}

/// One output's gauges: the cycle per class, then rotation, revocation
/// and import (per 1,000 devices) air times.
fn plan_gauges(
    m: &crate::metrics::Metrics,
    output: &str,
) -> (Vec<metrics::Gauge>, [metrics::Gauge; 3]) {
    let labels = |class: Option<&'static str>| {
        let mut l = vec![("output", output.to_owned())];
        l.extend(class.map(|c| ("class", c.to_owned())));
        l
    };
    let cycle = Class::ALL
        .iter()
        .map(|&c| {
            m.gauge(
                "casd_plan_cycle_seconds",
                "Planned carousel pass (every class's cycle) at the output's bitrate, from the live EMMs.",
                &labels(Some(class_name(c))),
            )
        })
        .collect();
    let once = [
        m.gauge(
            "casd_plan_rotation_seconds",
            "Air time of one pass of a group-addressed GK+GLK rotation (one group EMM per group).",
            &labels(None),
        ),
        m.gauge(
            "casd_plan_revocation_seconds",
            "Air time of one removal's key EMMs (255 group-mates, then the GLK to every group), first sending.",
            &labels(None),
        ),
        m.gauge(
            "casd_plan_import_seconds_per_1000_devices",
            "Air time of the first sending of 1,000 imported devices' EMMs (one product each).",
            &labels(None),
        ),
    ];
    (cycle, once)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text =
            "[database]\nurl = \"mysql://u:pw@127.0.0.1:3306/casd\"\n[api]\nplain_http = true\n\
                    [[cycler.outputs]]\ndestination = \"127.0.0.1:5000\"\nbitrate = 1000000\n";
        Config::from_toml_str(text, std::path::Path::new("t.toml"), std::iter::empty()).unwrap()
    }

    #[test]
    fn a_million_devices_rotate_in_seconds_of_air_at_one_megabit() {
        let cfg = config();
        let ask = Ask {
            import_devices: 0,
            products: 1,
            rotation_devices: Some(1_000_000),
        };
        let p = &plan(&cfg, &Live::default(), ask)[0];
        assert_eq!(p.rotation_groups, 3907);
        assert_eq!(group_key_emm_bytes(), 176);
        // 3,907 × 176 bytes × 8 × 188/184 / 1 Mbit/s.
        assert!(
            (p.rotation_once_s - 5.62).abs() < 0.01,
            "{}",
            p.rotation_once_s
        );
        assert!(p.rotation_once_s <= 30.0);
    }

    #[test]
    fn a_pass_is_every_class_once() {
        let cfg = config();
        let live = Live {
            emms: [1, 2, 3],
            bytes: [184, 368, 552],
            ..Live::default()
        };
        let ask = Ask {
            import_devices: 1000,
            products: 1,
            rotation_devices: None,
        };
        let p = &plan(&cfg, &live, ask)[0];
        let pass = 1104.0 * 8.0 * 188.0 / 184.0 / 1e6;
        for (c, bytes) in p.classes.iter().zip([184.0, 368.0, 552.0]) {
            assert!((c.cycle_s - pass).abs() < 1e-9);
            assert!((c.air_s - bytes * 8.0 * 188.0 / 184.0 / 1e6).abs() < 1e-9);
        }
        // adddevice: 151 (enable + keys) + 106 (a one-product set).
        assert_eq!(adddevice_bytes(1), 257);
        let import = 257_000.0 * 8.0 * 188.0 / 184.0 / 1e6;
        assert!((p.import_adds_to_cycle_s - import).abs() < 1e-9);
        assert!((p.import_first_send_s - 3.0 * import).abs() < 1e-9);
    }
}
