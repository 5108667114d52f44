//! The Encryptor: local sealing checked by opening as a receiver would, and
//! the same through the REST endpoint over real HTTP.

use std::sync::Arc;

use casd::encryptor::{
    Encryptor, LocalEncryptor, SealJob, SealJobError, SealResponse, SealResultJson,
};
use casd::keystore::{KeyKind, KeyStore};
use casd::testing::TestDb;
use casd_wire::crypto::{self, Key128};
use casd_wire::emm::{self, Address, Command, CommandSpec, DeviceId, Entitlement};

async fn encryptor(t: &TestDb) -> LocalEncryptor {
    let ks = KeyStore::open(t.db.clone(), Key128::from_bytes([9; 16]))
        .await
        .unwrap();
    ks.init().await.unwrap();
    LocalEncryptor::new(ks, 256)
}

fn job(emm_id: u64, address: Address, commands: Vec<CommandSpec>) -> SealJob {
    SealJob {
        emm_id,
        issued_at: 1_700_000_000,
        not_after: 1_800_000_000,
        address,
        key_version: None,
        commands,
    }
}

fn dev(id: u64) -> DeviceId {
    DeviceId::new(id).unwrap()
}

#[tokio::test]
async fn sealed_emms_open_with_the_receivers_keys() {
    let t = TestDb::new().await;
    let enc = encryptor(&t).await;
    let ks = enc.keystore().clone();
    let gk = enc.current_key(KeyKind::Group(3)).await.unwrap();
    let glk = enc.current_key(KeyKind::Global).await.unwrap();
    let ent = Entitlement {
        product_id: 42,
        start: 1_700_000_000,
        end: 1_800_000_000,
    };
    let jobs = vec![
        job(
            1,
            Address::Unique { device_id: dev(77) },
            vec![
                CommandSpec::DeviceEnable {},
                CommandSpec::GroupKey {
                    group_id: 3,
                    slot: 5,
                    key_version: gk.version,
                    activates_at: gk.activates_at,
                    key: (),
                },
                CommandSpec::GlobalKey {
                    key_version: glk.version,
                    activates_at: glk.activates_at,
                    key: (),
                },
            ],
        ),
        job(
            2,
            Address::group_with_slots(3, [5, 9]),
            vec![CommandSpec::EntitlementAdd(ent)],
        ),
        job(
            3,
            Address::Global,
            vec![CommandSpec::Osm {
                duration_s: 10,
                flags: casd_wire::emm::OSM_FLAG_FORCED,
                text: "hello".into(),
            }],
        ),
    ];
    let results = enc.seal_batch(jobs).await.unwrap();
    let sections: Vec<Vec<u8>> = results.into_iter().map(|r| r.unwrap().section).collect();

    // Unique: the receiver has only its DUK, derived from the PMK.
    let pmk = ks.key(KeyKind::Pmk, 1).await.unwrap();
    let duk = crypto::derive_duk(&pmk, 77);
    let opened = emm::open_emm(&sections[0], &duk).unwrap();
    assert_eq!(opened.emm_id.0, 1);
    assert_eq!(opened.address, Address::Unique { device_id: dev(77) });
    let Command::GroupKey {
        key,
        group_id: 3,
        slot: 5,
        ..
    } = &opened.commands[1]
    else {
        panic!("{:?}", opened.commands)
    };
    let Command::GlobalKey { key: glk_key, .. } = &opened.commands[2] else {
        panic!()
    };
    assert_eq!(opened.commands[0], Command::DeviceEnable);
    // Group and global EMMs open with the keys the unique EMM delivered.
    let g = emm::open_emm(&sections[1], key).unwrap();
    assert_eq!(g.commands, vec![Command::EntitlementAdd(ent)]);
    assert_eq!(g.key_version, gk.version);
    let gl = emm::open_emm(&sections[2], glk_key).unwrap();
    assert!(matches!(&gl.commands[0], Command::Osm { text, flags: 1, .. } if text == "hello"));
    // Another device's DUK does not open device 77's EMM.
    assert!(emm::open_emm(&sections[0], &crypto::derive_duk(&pmk, 78)).is_err());
}

#[tokio::test]
async fn refusals_are_per_job_and_precise() {
    let t = TestDb::new().await;
    let enc = encryptor(&t).await;
    let mut unknown = job(1, Address::Global, vec![CommandSpec::DeviceEnable {}]);
    unknown.key_version = Some(99);
    let too_big = job(
        2,
        Address::Global,
        vec![CommandSpec::Osm {
            duration_s: 0,
            flags: 0,
            text: "x".repeat(300),
        }],
    );
    let key_in_global = job(
        3,
        Address::Global,
        vec![CommandSpec::GlobalKey {
            key_version: 1,
            activates_at: 0,
            key: (),
        }],
    );
    let fine = job(4, Address::Global, vec![CommandSpec::DeviceEnable {}]);
    let r = enc
        .seal_batch(vec![unknown, too_big, key_in_global, fine])
        .await
        .unwrap();
    assert!(
        matches!(&r[0], Err(SealJobError::UnknownKey(m)) if m.contains("version 99")),
        "{:?}",
        r[0]
    );
    assert!(
        matches!(&r[1], Err(SealJobError::TooLarge(_))),
        "{:?}",
        r[1]
    );
    assert!(matches!(&r[2], Err(SealJobError::Invalid(_))), "{:?}", r[2]);
    assert!(r[3].is_ok());
}

#[tokio::test]
async fn rest_endpoint_seals_and_refuses_bad_requests() {
    let t = TestDb::new().await;
    let enc = encryptor(&t).await;
    let ks = enc.keystore().clone();
    // Behind the auth layer as in app::run (1 MiB body limit so the
    // 1001-job request reaches the handler's own check).
    let auth = casd::auth::Auth::new(
        t.db.clone(),
        casd::auth::AuthSettings {
            signing_key_file: None,
            ..Default::default()
        },
    );
    let router = casd::auth::protect(casd::encryptor::routes(Arc::new(enc)), auth, 1 << 20);
    let issuer = casd::auth::testing::TestIssuer::new(&t.db).await;
    let bearer = format!(
        "Bearer {}",
        issuer.token("emmg", &[casd::auth::Scope::Encrypt]).await
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(casd::http::serve(listener, router, stop.clone()));
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/encryptor/v1/seal");
    let token = bearer.as_str();

    let body = serde_json::json!({"jobs": [job(5, Address::Unique { device_id: dev(9) }, vec![CommandSpec::EntitlementRemove { product_id: 3 }])]});
    let resp = http
        .post(&url)
        .header("authorization", token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let parsed: SealResponse = resp.json().await.unwrap();
    let SealResultJson::Ok(sealed) = &parsed.results[0] else {
        panic!("refused")
    };
    let duk = crypto::derive_duk(&ks.key(KeyKind::Pmk, 1).await.unwrap(), 9);
    assert_eq!(
        emm::open_emm(&sealed.section, &duk).unwrap().commands,
        vec![Command::EntitlementRemove { product_id: 3 }]
    );

    // Malformed JSON, wrong field type, too many jobs, no token.
    let r = http
        .post(&url)
        .header("authorization", token)
        .body("{\"jobs\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(&url)
        .header("authorization", token)
        .json(&serde_json::json!({"jobs": [{"emm_id": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["field"], "jobs[0].emm_id", "{e}");
    let many: Vec<SealJob> = (0..1001)
        .map(|i| job(i, Address::Global, vec![CommandSpec::DeviceEnable {}]))
        .collect();
    let r = http
        .post(&url)
        .header("authorization", token)
        .json(&serde_json::json!({"jobs": many}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    stop.cancel();
    server.await.unwrap().unwrap();
}
