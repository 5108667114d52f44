//! Key rotation and refresh end to end: the headend with every role in one
//! process (sms, emmg, encryptor, cycler, scheduler), jobs triggered over
//! HTTP (`POST /jobs/{name}/run`), the air captured on 127.0.0.1 and
//! decoded by reference receivers that hold only their DUK: group-addressed
//! GK/GLK rotation, a receiver that was off catching up from its refresh,
//! and revocation (a removed device's receiver opens nothing issued after).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use casd::config::Role;
use casd::keystore::{KeyKind, KeyStore};
use casd::testing::{Capture, Running, TestDb};
use casd_wire::crypto::{derive_duk, Key128};
use casd_wire::receiver::{Outcome, Receiver};
use mysql_async::prelude::*;
use serde_json::{json, Value};

/// Guard against a hung test (not a synchronisation).
const LIMIT: Duration = Duration::from_secs(60);

fn now_unix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32
}

struct Rig {
    t: TestDb,
    sms_bearer: String,
    ops_bearer: String,
    cap: Capture,
    http: reqwest::Client,
    base: String,
    n: u32,
    casd: Running,
    pmk: Key128,
    rx: HashMap<u64, Receiver>,
    /// (table_id, key_version) of every group/global section a receiver opened.
    opened: BTreeSet<(u8, u32)>,
    /// Receivers fed only their unique EMMs (see `an_off_receiver_…`).
    unique_only: BTreeSet<u64>,
}

impl Rig {
    async fn start() -> Rig {
        Rig::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut casd::config::Config)) -> Rig {
        let t = TestDb::new().await;
        let cap = Capture::bind(0x0101).await;
        let mut cfg = casd::testing::config(&t.url, cap.addr());
        cfg.scheduler.tick_ms = 50;
        adjust(&mut cfg);
        let root = hw::FileKeySource::create_new(&cfg.keys.root_key_file).unwrap();
        let roles = vec![
            Role::Sms,
            Role::Emmg,
            Role::Encryptor,
            Role::Cycler,
            Role::Scheduler,
        ];
        let casd = Running::start(cfg, roles).await;
        casd.ready().await;
        let http = reqwest::Client::new();
        let base = casd.base.clone();
        use hw::KeySource;
        let ks = KeyStore::open(t.db.clone(), Key128::from(root.root_key().unwrap()))
            .await
            .unwrap();
        let pmk = (*ks.key(KeyKind::Pmk, 1).await.unwrap()).clone();
        use casd::auth::{testing::token_for, Scope};
        let sms_bearer = format!(
            "Bearer {}",
            token_for(&t.db, "sms-rot", &[Scope::SmsWrite, Scope::SmsRead]).await
        );
        let ops_bearer = format!("Bearer {}", token_for(&t.db, "ops", &[Scope::Admin]).await);
        Rig {
            sms_bearer,
            ops_bearer,
            t,
            cap,
            http,
            base,
            n: 0,
            casd,
            pmk,
            rx: HashMap::new(),
            opened: BTreeSet::new(),
            unique_only: BTreeSet::new(),
        }
    }

    fn receiver(&mut self, d: u64) {
        self.rx
            .insert(d, Receiver::new(d, derive_duk(&self.pmk, d)));
    }

    async fn sms(&mut self, path: &str, mut body: Value) {
        self.n += 1;
        body["transaction_id"] = json!(format!("rot-{}", self.n));
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("authorization", &self.sms_bearer)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}: {}", r.text().await.unwrap());
    }

    /// Triggers `job` over HTTP and waits for the run that took the
    /// trigger to end; returns its counts.
    async fn job(&mut self, job: &str, params: Value) -> Value {
        let r = self
            .http
            .post(format!("{}/jobs/{job}/run", self.base))
            .header("authorization", &self.ops_bearer)
            .json(&params)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        let id = v["trigger_id"].as_u64().unwrap();
        let mut c = self.t.db.conn().await.unwrap();
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let row: Option<(Option<String>, Option<String>)> = c
                .exec_first(
                    "SELECT r.outcome, r.counts FROM job_triggers t JOIN job_runs r ON r.id = t.run_id \
                     WHERE t.id = ?",
                    (id,),
                )
                .await
                .unwrap();
            if let Some((Some(outcome), counts)) = row {
                let counts: Value = serde_json::from_str(&counts.unwrap_or_default()).unwrap();
                assert_eq!(outcome, "ok", "{job}: {counts}");
                return counts;
            }
            assert!(tokio::time::Instant::now() < deadline, "{job} never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Feeds the air to the receivers until `done` holds.
    async fn air_until(&mut self, what: &str, done: impl Fn(&HashMap<u64, Receiver>) -> bool) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        while !done(&self.rx) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let s = self
                .cap
                .next_section(left)
                .await
                .unwrap_or_else(|| panic!("never on air: {what}"));
            let view = casd_wire::crypto::parse_section(&s).unwrap();
            let (table, version) = (view.table_id, view.key_version);
            for r in self.rx.values_mut() {
                if table != 0x82 && self.unique_only.contains(&r.device_id) {
                    continue;
                }
                match r.accept(&s, now_unix()) {
                    Outcome::Rejected(e) => {
                        panic!("receiver {} rejected a section: {e}", r.device_id)
                    }
                    Outcome::Applied { .. } if table != 0x82 => {
                        self.opened.insert((table, version));
                    }
                    _ => {}
                }
            }
        }
        // The capture drains its socket on a thread of its own, so a CC or
        // CRC error here is the sender's, not this busy test's.
        assert!(
            self.cap.errors.is_empty(),
            "stream errors: {:?}",
            self.cap.errors
        );
    }

    async fn current_glk(&self) -> u32 {
        let mut c = self.t.db.conn().await.unwrap();
        casd::keystore::current_meta(&mut c, KeyKind::Global, now_unix())
            .await
            .unwrap()
            .unwrap()
            .version
    }

    /// Waits (wall clock: the system needs it) until GLK `v` is current.
    async fn until_active(&self, v: u32) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        while self.current_glk().await < v {
            assert!(
                tokio::time::Instant::now() < deadline,
                "GLK v{v} never active"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn key_states(&self, kind: KeyKind) -> Vec<(u32, String)> {
        let mut c = self.t.db.conn().await.unwrap();
        casd::keystore::list_meta(&mut c, kind)
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.version, m.state))
            .collect()
    }

    async fn stop(self) {
        self.casd.shutdown().await.unwrap();
    }
}

fn has_osm(r: &Receiver, text: &str) -> bool {
    r.osms.iter().any(|o| o.text == text)
}

fn holds(r: &Receiver, v: u32) -> bool {
    r.group_key_versions().iter().any(|(x, _)| *x == v)
        && r.global_key_versions().iter().any(|(x, _)| *x == v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_follow_two_rotations_from_the_air() {
    let mut rig = Rig::start().await;
    let devices = [1001u64, 1002, 1003];
    for d in devices {
        rig.receiver(d);
        rig.sms("/adddevice", json!({"device_id": d})).await;
    }
    rig.air_until("v1 keys", |rx| rx.values().all(|r| holds(r, 1)))
        .await;
    let group = rig.rx[&1001].group.unwrap().0;
    // Long-lived group and global OSMs under v1: re-sealed at each rotation.
    rig.sms(
        "/generateosm",
        json!({"group_id": group, "text": "standing group", "duration_s": 0}),
    )
    .await;
    rig.sms(
        "/generateosm",
        json!({"all": true, "text": "standing global", "duration_s": 0}),
    )
    .await;
    rig.air_until("standing OSMs", |rx| {
        rx.values()
            .all(|r| has_osm(r, "standing group") && has_osm(r, "standing global"))
    })
    .await;

    for (round, v) in [(1, 2u32), (2, 3u32)] {
        // Create and deliver the next version, activating in 3 s.
        let counts = rig
            .job("rotation", json!({"force": true, "activates_in_s": 3}))
            .await;
        assert_eq!(counts["glk_version"], v, "{counts}");
        assert_eq!(counts["gk_versions_created"], 1, "{counts}");
        // Group-addressed: one item for the one group, not one per device.
        assert_eq!(counts["delivergroupkeys_enqueued"], 1, "{counts}");
        // Every receiver learns GK_v / GLK_v from the air, knowing only its
        // DUK and GK_(v-1): one group EMM under GK_(v-1), no unique one.
        rig.air_until(&format!("round {round}: v{v} keys"), |rx| {
            rx.values().all(|r| holds(r, v))
        })
        .await;
        let mut c = rig.t.db.conn().await.unwrap();
        let keys: Vec<(String, u32)> = c
            .query("SELECT addressing, key_version FROM emms WHERE purpose = 'keys' ORDER BY id")
            .await
            .unwrap();
        let want: Vec<(String, u32)> = (1..=round).map(|r| ("group".into(), r)).collect();
        assert_eq!(
            keys, want,
            "key EMMs: one group EMM per rotation, under the old GK"
        );
        rig.until_active(v).await;
        // At activation: activate, re-seal the standing OSMs, retire v-1.
        let counts = rig.job("rotation", json!({})).await;
        // The two standing OSMs, and from round 2 the two sent after round 1.
        assert_eq!(counts["resealed"], 2 * round, "{counts}");
        assert_eq!(counts["activated"], 2, "{counts}");
        // The GLK v-1 retires; the GK v-1 still seals the live key EMM
        // (for a device back on within the hour) and retires after it.
        assert_eq!(counts["retired"], 1, "{counts}");
        for (kind, old) in [
            (KeyKind::Global, "retired"),
            (KeyKind::Group(group), "retiring"),
        ] {
            let states = rig.key_states(kind).await;
            assert_eq!(
                states.last().unwrap(),
                &(v, "active".into()),
                "{kind}: {states:?}"
            );
            assert!(
                states[..states.len() - 1].iter().all(|(_, s)| s == old),
                "{kind}: {states:?}"
            );
        }
        // New group and global EMMs are sealed under v and decoded.
        let (gt, at) = (
            format!("group after {round}"),
            format!("global after {round}"),
        );
        rig.sms(
            "/generateosm",
            json!({"group_id": group, "text": gt, "duration_s": 5}),
        )
        .await;
        rig.sms(
            "/generateosm",
            json!({"all": true, "text": at, "duration_s": 5}),
        )
        .await;
        rig.air_until(&format!("round {round}: OSMs under v{v}"), |rx| {
            rx.values().all(|r| has_osm(r, &gt) && has_osm(r, &at))
        })
        .await;
        assert!(rig.opened.contains(&(0x83, v)), "{:?}", rig.opened);
        assert!(rig.opened.contains(&(0x84, v)), "{:?}", rig.opened);
        let mut c = rig.t.db.conn().await.unwrap();
        let live_versions: Vec<(String, u32)> = c
            .query(
                "SELECT DISTINCT addressing, key_version FROM emms WHERE state = 'live' \
                 AND addressing <> 'unique' AND purpose <> 'keys'",
            )
            .await
            .unwrap();
        assert!(
            live_versions.iter().all(|(_, kv)| *kv == v),
            "live group/global EMMs under an old version: {live_versions:?}"
        );
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_added_mid_rotation_decodes_group_emms_under_both_versions() {
    let mut rig = Rig::start().await;
    rig.receiver(2001);
    rig.sms("/adddevice", json!({"device_id": 2001})).await;
    rig.air_until("v1 keys", |rx| holds(&rx[&2001], 1)).await;
    // A rotation far ahead: v2 is pending.
    let counts = rig
        .job("rotation", json!({"force": true, "activates_in_s": 3600}))
        .await;
    assert_eq!(counts["glk_version"], 2);
    // Added now, the device gets v1 (current) and v2 (pending).
    rig.receiver(2002);
    rig.sms("/adddevice", json!({"device_id": 2002})).await;
    rig.air_until("both versions", |rx| {
        holds(&rx[&2002], 1) && holds(&rx[&2002], 2)
    })
    .await;
    let group = rig.rx[&2002].group.unwrap().0;
    rig.sms(
        "/generateosm",
        json!({"group_id": group, "text": "under v1", "duration_s": 5}),
    )
    .await;
    rig.air_until("group OSM under v1", |rx| has_osm(&rx[&2002], "under v1"))
        .await;
    // Simulated clock: the activation instant is brought forward to now
    // (key metadata only) instead of waiting an hour.
    let mut c = rig.t.db.conn().await.unwrap();
    c.query_drop("UPDATE `keys` SET activates_at = UTC_TIMESTAMP() - INTERVAL 1 SECOND WHERE kind IN ('group', 'global') AND version = 2")
        .await
        .unwrap();
    rig.sms(
        "/generateosm",
        json!({"group_id": group, "text": "under v2", "duration_s": 5}),
    )
    .await;
    rig.air_until("group OSM under v2", |rx| {
        has_osm(&rx[&2002], "under v2") && has_osm(&rx[&2001], "under v2")
    })
    .await;
    assert!(rig.opened.contains(&(0x83, 1)), "{:?}", rig.opened);
    assert!(rig.opened.contains(&(0x83, 2)), "{:?}", rig.opened);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_replaces_stale_entitlement_sets_in_the_background_carousel() {
    let mut rig = Rig::start().await;
    for d in [3001u64, 3002] {
        rig.receiver(d);
        rig.sms("/adddevice", json!({"device_id": d})).await;
    }
    rig.sms(
        "/addentitlement",
        json!({"device_id": 3001, "product_id": 9, "start": 1_700_000_000u32, "end": 1_900_000_000u32}),
    )
    .await;
    rig.air_until("entitlement", |rx| rx[&3001].entitlements.contains_key(&9))
        .await;
    let mut c = rig.t.db.conn().await.unwrap();
    // Device 3001's set is 10 days old; 3002's is fresh.
    c.query_drop(
        "UPDATE emms SET created_at = UTC_TIMESTAMP(6) - INTERVAL 10 DAY \
         WHERE purpose = 'entitlement_set' AND address = 3001 AND state = 'live'",
    )
    .await
    .unwrap();
    let old: Vec<u64> = c
        .query("SELECT id FROM emms WHERE purpose = 'entitlement_set' AND address = 3001 AND state = 'live'")
        .await
        .unwrap();
    let counts = rig.job("refresh", json!({})).await;
    assert_eq!(counts["devices"], 2, "{counts}");
    assert_eq!(counts["refreshset_enqueued"], 1, "{counts}");
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let live: Vec<(u64, u8)> = c
            .query("SELECT id, class FROM emms WHERE purpose = 'entitlement_set' AND address = 3001 AND state = 'live'")
            .await
            .unwrap();
        if live.len() == 1 && !old.contains(&live[0].0) {
            assert_eq!(live[0].1, carousel::Class::Background as u8);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refreshed: {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The fresh set still says the same.
    rig.air_until("refreshed set on air", |rx| {
        rx[&3001].entitlements.contains_key(&9)
    })
    .await;
    rig.stop().await;
}

/// Keys only: the GK and GLK versions a receiver holds.
fn versions(r: &Receiver) -> (Vec<u32>, Vec<u32>) {
    let v = |l: Vec<(u32, u32)>| l.into_iter().map(|(v, _)| v).collect();
    (v(r.group_key_versions()), v(r.global_key_versions()))
}

/// A receiver that was off during a group-addressed rotation catches up
/// from its unique ENTITLEMENT_SET refresh, which carries its keys. By the
/// time such a receiver is back the rotation's group EMMs have left the
/// carousel (an hour after activation): the test stands in for that by
/// feeding it only its unique EMMs until it holds the new keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_off_receiver_catches_up_from_its_refresh() {
    let mut rig = Rig::start().await;
    for d in [5001u64, 5002] {
        rig.receiver(d);
        rig.sms("/adddevice", json!({"device_id": d})).await;
    }
    rig.air_until("v1 keys", |rx| rx.values().all(|r| holds(r, 1)))
        .await;
    // 5002 goes off: it sees nothing of the rotation.
    let off = rig.rx.remove(&5002).unwrap();
    let counts = rig
        .job("rotation", json!({"force": true, "activates_in_s": 2}))
        .await;
    assert_eq!(counts["glk_version"], 2, "{counts}");
    rig.air_until("v2 keys on", |rx| holds(&rx[&5001], 2)).await;
    rig.until_active(2).await;
    rig.job("rotation", json!({})).await;
    // Back on, it holds only v1: group/global EMMs under v2 are closed to it.
    rig.rx.insert(5002, off);
    rig.unique_only.insert(5002);
    assert_eq!(versions(&rig.rx[&5002]), (vec![1], vec![1]));
    // Its set is due for a refresh (made 10 days ago).
    let mut c = rig.t.db.conn().await.unwrap();
    c.query_drop(
        "UPDATE emms SET created_at = UTC_TIMESTAMP(6) - INTERVAL 10 DAY \
         WHERE purpose = 'entitlement_set' AND address = 5002 AND state = 'live'",
    )
    .await
    .unwrap();
    let counts = rig.job("refresh", json!({})).await;
    assert_eq!(counts["refreshset_enqueued"], 1, "{counts}");
    rig.air_until("v2 keys from the refresh", |rx| holds(&rx[&5002], 2))
        .await;
    let review: String = c
        .query_first(
            "SELECT emm_data FROM emms WHERE purpose = 'entitlement_set' AND address = 5002 \
             AND state = 'live'",
        )
        .await
        .unwrap()
        .unwrap();
    assert!(
        review.contains(r#""type":"group_key""#) && review.contains(r#""type":"entitlement_set""#),
        "{review}"
    );
    // Now it opens what is sent under v2.
    rig.unique_only.clear();
    let group = rig.rx[&5002].group.unwrap().0;
    rig.sms(
        "/generateosm",
        json!({"group_id": group, "text": "back", "duration_s": 5}),
    )
    .await;
    rig.sms(
        "/generateosm",
        json!({"all": true, "text": "back all", "duration_s": 5}),
    )
    .await;
    rig.air_until("OSMs under v2", |rx| {
        has_osm(&rx[&5002], "back") && has_osm(&rx[&5002], "back all")
    })
    .await;
    assert!(rig.opened.contains(&(0x83, 2)) && rig.opened.contains(&(0x84, 2)));
    rig.stop().await;
}

/// Revocation: removing a device rotates its group's GK (to the remaining
/// members only, unique EMMs) and, after `glk_rotation_removals` (1)
/// removals, the GLK (group-addressed). The removed device's receiver,
/// which keeps listening to everything, never holds the new keys and opens
/// no group or global EMM issued after; its former group-mates do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_opens_nothing_issued_after_its_removal() {
    let mut rig = Rig::start_with(|cfg| {
        cfg.scheduler.revocation_schedule = "manual".into();
    })
    .await;
    let (mates, gone) = ([6001u64, 6002, 6003], 6004u64);
    for d in mates.into_iter().chain([gone]) {
        rig.receiver(d);
        rig.sms("/adddevice", json!({"device_id": d})).await;
    }
    rig.air_until("v1 keys", |rx| rx.values().all(|r| holds(r, 1)))
        .await;
    let group = rig.rx[&gone].group.unwrap().0;
    assert!(mates.iter().all(|d| rig.rx[d].group.unwrap().0 == group));

    rig.sms("/removedevice", json!({"device_id": gone})).await;
    // The group's GK_2 reaches the remaining members in unique EMMs.
    rig.air_until("GK_2 to the group-mates", |rx| {
        mates.iter().all(|d| versions(&rx[d]).0.contains(&2)) && rx[&gone].enabled == Some(false)
    })
    .await;
    let mut c = rig.t.db.conn().await.unwrap();
    let rows: Vec<(u64, u32, u32, Option<u32>)> = c
        .query("SELECT device_id, group_id, gk_version, glk_version FROM revocations")
        .await
        .unwrap();
    assert_eq!(rows, vec![(gone, group, 2, None)]);
    // The GLK: one group EMM per group, under the group's new GK.
    let counts = rig.job("revocation", json!({})).await;
    assert_eq!(counts["glk_version"], 2, "{counts}");
    assert_eq!(counts["delivergroupkeys_enqueued"], 1, "{counts}");
    rig.air_until("GLK_2 to the group-mates", |rx| {
        mates.iter().all(|d| holds(&rx[d], 2))
    })
    .await;
    let glk_rows: Vec<u32> = c
        .query("SELECT glk_version FROM revocations WHERE glk_version IS NOT NULL")
        .await
        .unwrap();
    assert_eq!(glk_rows, vec![2]);
    // Nothing more is due.
    let counts = rig.job("revocation", json!({})).await;
    assert_eq!(counts["removals_pending"], 0, "{counts}");
    assert!(counts.get("glk_version").is_none(), "{counts}");

    // Group and global EMMs issued after the removal.
    for (target, text) in [
        (json!({"group_id": group}), "after removal (group)"),
        (json!({"all": true}), "after removal (global)"),
    ] {
        let mut body = target;
        body["text"] = json!(text);
        body["duration_s"] = json!(5);
        rig.sms("/generateosm", body).await;
    }
    rig.air_until("the group-mates open both", |rx| {
        mates.iter().all(|d| {
            has_osm(&rx[d], "after removal (group)") && has_osm(&rx[d], "after removal (global)")
        })
    })
    .await;
    assert!(rig.opened.contains(&(0x83, 2)) && rig.opened.contains(&(0x84, 2)));
    // The removed device heard all of it and holds neither key they are
    // sealed under, so no key it has opens them.
    let r = &rig.rx[&gone];
    assert_eq!(versions(r), (vec![1], vec![1]), "removed device's keys");
    assert!(!has_osm(r, "after removal (group)") && !has_osm(r, "after removal (global)"));
    let mut sealed_under: Vec<(String, u32)> = c
        .query("SELECT addressing, key_version FROM emms WHERE purpose = 'osm' AND state = 'live'")
        .await
        .unwrap();
    sealed_under.sort();
    assert_eq!(
        sealed_under,
        vec![("global".into(), 2), ("group".into(), 2)]
    );
    rig.stop().await;
}
