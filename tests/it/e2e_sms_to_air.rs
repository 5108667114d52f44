//! SMS to air, end to end: the headend with every role in one process, a
//! test SMS posting each command over real HTTP, the carousel captured on a
//! UDP socket on 127.0.0.1, sections reassembled (CRC and continuity
//! checked), opened by reference receivers holding only their DUK (derived
//! from the test PMK), and the decoded state compared with what was posted.

use std::collections::HashMap;
use std::time::Duration;

use casd::config::Role;
use casd::keystore::{KeyKind, KeyStore};
use casd::testing::{Capture, Running, TestDb};
use casd_wire::crypto::{derive_duk, Key128};
use casd_wire::receiver::Receiver;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(20);

struct Sms {
    http: reqwest::Client,
    base: String,
    n: u32,
    bearer: String,
}

impl Sms {
    async fn post(&mut self, path: &str, mut body: Value) -> Value {
        self.n += 1;
        body["transaction_id"] = json!(format!("e2e-{}", self.n));
        crate::common::post_accepted(&self.http, &self.base, &self.bearer, path, &body).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_reaches_the_receivers_it_addresses() {
    let t = TestDb::new().await;
    let mut cap = Capture::bind(0x0101).await;
    let cfg = casd::testing::config(&t.url, cap.addr());
    let root = hw::FileKeySource::create_new(&cfg.keys.root_key_file).unwrap();
    let roles = vec![Role::Sms, Role::Emmg, Role::Encryptor, Role::Cycler];
    let casd = Running::start(cfg.clone(), roles).await;
    let mut sms = Sms {
        http: reqwest::Client::new(),
        base: casd.base.clone(),
        n: 0,
        bearer: format!(
            "Bearer {}",
            casd::auth::testing::token_for(
                &t.db,
                "sms-e2e",
                &[casd::auth::Scope::SmsWrite, casd::auth::Scope::SmsRead]
            )
            .await
        ),
    };
    // Ready when every role is.
    casd.ready().await;

    // The test factory's PMK: what devices are personalised with.
    use hw::KeySource;
    let ks = KeyStore::open(t.db.clone(), Key128::from(root.root_key().unwrap()))
        .await
        .unwrap();
    let pmk = ks.key(KeyKind::Pmk, 1).await.unwrap();
    let mut rx: HashMap<u64, Receiver> = [1001u64, 1002, 1003]
        .into_iter()
        .map(|d| (d, Receiver::new(d, derive_duk(&pmk, d))))
        .collect();

    // adddevice: enabled, group slot and both keys delivered.
    for d in [1001u64, 1002] {
        sms.post("/adddevice", json!({"device_id": d})).await;
    }
    casd::testing::air_until(&mut cap, &mut rx, "adddevice", LIMIT, |rx| {
        [1001, 1002].iter().all(|d| {
            rx[d].enabled == Some(true)
                && rx[d].group.is_some()
                && !rx[d].global_key_versions().is_empty()
        })
    })
    .await;
    assert_eq!(rx[&1003].enabled, None, "device 1003 was never added");
    let dev: Value = sms
        .http
        .get(format!("{}/devices/1001", sms.base))
        .header("authorization", &sms.bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        rx[&1001].group,
        Some((
            dev["group_id"].as_u64().unwrap() as u32,
            dev["slot"].as_u64().unwrap() as u8
        )),
        "{dev}"
    );

    // addentitlement / removeentitlement.
    sms.post("/addentitlement", json!({"device_id": 1001, "product_id": 7, "start": "2026-01-01T00:00:00Z", "end": 1_900_000_000u32})).await;
    casd::testing::air_until(&mut cap, &mut rx, "addentitlement", LIMIT, |rx| {
        rx[&1001].entitlements.get(&7) == Some(&(1_767_225_600, 1_900_000_000))
    })
    .await;
    assert!(
        rx[&1002].entitlements.is_empty(),
        "another device got the entitlement"
    );
    sms.post("/addentitlement", json!({"device_id": 1002, "product_id": 8, "start": 1_700_000_000u32, "end": 1_900_000_000u32})).await;
    sms.post(
        "/removeentitlement",
        json!({"device_id": 1001, "product_id": 7}),
    )
    .await;
    casd::testing::air_until(&mut cap, &mut rx, "removeentitlement", LIMIT, |rx| {
        rx[&1001].entitlements.is_empty() && rx[&1002].entitlements.contains_key(&8)
    })
    .await;

    // OSM: to one device, to its group, to everyone.
    let group = rx[&1001].group.unwrap().0;
    sms.post(
        "/generateosm",
        json!({"device_id": 1001, "text": "unique msg", "duration_s": 10}),
    )
    .await;
    sms.post(
        "/generateosm",
        json!({"group_id": group, "text": "group msg", "duration_s": 5, "forced": true}),
    )
    .await;
    sms.post(
        "/generateosm",
        json!({"all": true, "text": "global msg", "duration_s": 0}),
    )
    .await;
    let has = |r: &Receiver, text: &str| r.osms.iter().any(|o| o.text == text);
    casd::testing::air_until(&mut cap, &mut rx, "osm", LIMIT, |rx| {
        has(&rx[&1001], "unique msg")
            && has(&rx[&1001], "group msg")
            && has(&rx[&1002], "group msg")
            && has(&rx[&1001], "global msg")
            && has(&rx[&1002], "global msg")
    })
    .await;
    assert!(
        !has(&rx[&1002], "unique msg"),
        "unique OSM reached another device"
    );
    assert!(rx[&1002]
        .osms
        .iter()
        .any(|o| o.text == "group msg" && o.forced && o.duration_s == 5));
    assert!(
        rx[&1003].osms.is_empty(),
        "a device never added decoded OSMs"
    );

    // Optional measurement (CASD_TEST_MEASURE_ACTIVATION=N): N commands one at a
    // time, from the 200 to the receiver applying it, for the split-vs-one-
    // process comparison in the notes. Not a timed assertion.
    if let Some(n) = std::env::var("CASD_TEST_MEASURE_ACTIVATION")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        let mut ms = Vec::new();
        for p in 0..n {
            let product = 10_000 + p;
            sms.post("/addentitlement", json!({"device_id": 1001, "product_id": product, "start": 1_700_000_000u32, "end": 1_900_000_000u32})).await;
            let t0 = std::time::Instant::now();
            casd::testing::air_until(&mut cap, &mut rx, "measured command", LIMIT, |rx| {
                rx[&1001].entitlements.contains_key(&product)
            })
            .await;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        println!(
            "activation, one process: p50 {:.1} ms, p99 {:.1} ms over {n} sequential commands",
            ms[ms.len() / 2],
            ms[(ms.len() - 1) * 99 / 100]
        );
    }

    // removedevice: DEVICE_DISABLE reaches it.
    sms.post("/removedevice", json!({"device_id": 1002})).await;
    casd::testing::air_until(&mut cap, &mut rx, "removedevice", LIMIT, |rx| {
        rx[&1002].enabled == Some(false)
    })
    .await;
    assert!(rx[&1002].entitlements.is_empty());
    assert_eq!(rx[&1001].enabled, Some(true));

    casd.shutdown().await.unwrap();
}
