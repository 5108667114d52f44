//! The Cycler role against a real MariaDB and a real UDP socket on 127.0.0.1.

use std::time::Duration;

use casd::config::Role;
use casd::encryptor::{Encryptor, LocalEncryptor, SealJob};
use casd::keystore::KeyStore;
use casd::testing::{Capture, Running, TcpProxy, TestDb};
use casd_wire::crypto::Key128;
use casd_wire::emm::{Address, CommandSpec};
use mysql_async::prelude::*;

const LIMIT: Duration = Duration::from_secs(10);

pub(crate) async fn encryptor(db: &casd::db::Db) -> LocalEncryptor {
    let ks = KeyStore::open(db.clone(), Key128::from_bytes([1; 16]))
        .await
        .unwrap();
    ks.init().await.unwrap();
    LocalEncryptor::new(ks, 256)
}

/// Seals a global OSM EMM and returns (emm_id, section) without storing it.
pub(crate) async fn seal(
    c: &mut mysql_async::Conn,
    enc: &LocalEncryptor,
    text: &str,
) -> (u64, Vec<u8>) {
    let id: Option<u64> = c.query_first("SELECT NEXTVAL(emm_id_seq)").await.unwrap();
    let id = id.unwrap();
    let job = SealJob {
        emm_id: id,
        issued_at: 1_700_000_000,
        not_after: 2_000_000_000,
        address: Address::Global,
        key_version: None,
        commands: vec![CommandSpec::Osm {
            duration_s: 5,
            flags: 0,
            text: text.into(),
        }],
    };
    let s = enc.seal_batch(vec![job]).await.unwrap().remove(0).unwrap();
    (id, s.section)
}

pub(crate) async fn store(c: &mut impl Queryable, id: u64, section: &[u8], not_after: &str) {
    c.exec_drop(
        "INSERT INTO emms (id, addressing, address, key_version, class, purpose, emm_data, encrypted_emm, created_at, not_after, state) \
         VALUES (?, 'global', 0, 1, 1, 'osm', '[]', ?, UTC_TIMESTAMP(6), ?, 'live')",
        (id, section, not_after),
    )
    .await
    .unwrap();
    c.exec_drop(
        "INSERT INTO carousel_events (emm_id, op, created_at) VALUES (?, 'add', UTC_TIMESTAMP(6))",
        (id,),
    )
    .await
    .unwrap();
}

async fn withdraw(c: &mut impl Queryable, id: u64) {
    c.exec_drop("UPDATE emms SET state = 'withdrawn' WHERE id = ?", (id,))
        .await
        .unwrap();
    c.exec_drop("INSERT INTO carousel_events (emm_id, op, created_at) VALUES (?, 'remove', UTC_TIMESTAMP(6))", (id,))
        .await
        .unwrap();
}

async fn start(url: &str, capture: &Capture) -> (Running, casd::config::Config) {
    let cfg = casd::testing::config(url, capture.addr());
    (Running::start(cfg.clone(), vec![Role::Cycler]).await, cfg)
}

#[tokio::test]
async fn plays_stored_emms_then_follows_adds_and_withdrawals() {
    let t = TestDb::new().await;
    let enc = encryptor(&t.db).await;
    let mut c = t.db.conn().await.unwrap();
    let (a, sec_a) = seal(&mut c, &enc, "stored before start").await;
    store(&mut c, a, &sec_a, "2033-01-01 00:00:00").await;
    // Expired: must never be played.
    let (x, sec_x) = seal(&mut c, &enc, "expired").await;
    store(&mut c, x, &sec_x, "2001-01-01 00:00:00").await;

    let mut cap = Capture::bind(0x0101).await;
    let (casd, cfg) = start(&t.url, &cap).await;
    assert!(
        cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some(),
        "stored EMM never played"
    );

    let (b, sec_b) = seal(&mut c, &enc, "added while running").await;
    store(&mut c, b, &sec_b, "2033-01-01 00:00:00").await;
    assert!(
        cap.until(LIMIT, |s| s == &sec_b[..]).await.is_some(),
        "new EMM never played"
    );

    // Withdraw A, then add a marker C: once C is on air, A's removal (an
    // earlier event) has reached the player, so A must not start again.
    withdraw(&mut c, a).await;
    let (m, sec_m) = seal(&mut c, &enc, "marker").await;
    store(&mut c, m, &sec_m, "2033-01-01 00:00:00").await;
    assert!(cap.until(LIMIT, |s| s == &sec_m[..]).await.is_some());
    let mut seen = 0;
    for _ in 0..200 {
        let s = cap.next_section(LIMIT).await.expect("carousel went quiet");
        assert_ne!(&s[..], &sec_a[..], "withdrawn EMM still on air");
        assert_ne!(&s[..], &sec_x[..], "expired EMM on air");
        seen += 1;
    }
    assert_eq!(seen, 200);
    assert!(cap.errors.is_empty(), "stream errors: {:?}", cap.errors);

    casd.shutdown().await.unwrap();
    // The play-out log names what was played, per output.
    let log = std::fs::read_to_string(&cfg.cycler.log_file).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(first["output"], "test");
    assert!(
        log.lines().any(|l| l.contains(&format!("\"emm_id\":{b},"))),
        "B not in the play-out log"
    );
}

#[tokio::test]
async fn a_late_committing_transaction_is_not_missed() {
    let t = TestDb::new().await;
    let enc = encryptor(&t.db).await;
    let mut c = t.db.conn().await.unwrap();
    let mut cap = Capture::bind(0x0101).await;
    let (casd, _) = start(&t.url, &cap).await;

    // Transaction 1 takes the lower event id but commits last.
    let (a, sec_a) = seal(&mut c, &enc, "late commit").await;
    let (b, sec_b) = seal(&mut c, &enc, "early commit").await;
    let mut c1 = t.db.conn().await.unwrap();
    let mut tx1 = c1.start_transaction(Default::default()).await.unwrap();
    store(&mut tx1, a, &sec_a, "2033-01-01 00:00:00").await;
    store(&mut c, b, &sec_b, "2033-01-01 00:00:00").await;
    assert!(cap.until(LIMIT, |s| s == &sec_b[..]).await.is_some());
    tx1.commit().await.unwrap();
    assert!(
        cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some(),
        "the hole's EMM was never played"
    );
    casd.shutdown().await.unwrap();
}

#[tokio::test]
async fn on_air_continues_while_the_database_is_away() {
    let t = TestDb::new().await;
    let enc = encryptor(&t.db).await;
    let mut c = t.db.conn().await.unwrap();
    let (a, sec_a) = seal(&mut c, &enc, "keeps playing").await;
    store(&mut c, a, &sec_a, "2033-01-01 00:00:00").await;

    let proxy = TcpProxy::start(casd::testing::server_addr()).await;
    let mut cap = Capture::bind(0x0101).await;
    let (casd, _) = start(&proxy.url_via(&t.url), &cap).await;
    assert!(cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some());

    proxy.cut();
    // The database is unreachable for the cycler: the carousel still plays A, repeatedly.
    for _ in 0..20 {
        assert!(
            cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some(),
            "on air stopped with the database"
        );
    }
    // Written meanwhile, played once the database is back.
    let (b, sec_b) = seal(&mut c, &enc, "written during the outage").await;
    store(&mut c, b, &sec_b, "2033-01-01 00:00:00").await;
    proxy.restore().await;
    assert!(
        cap.until(Duration::from_secs(20), |s| s == &sec_b[..])
            .await
            .is_some(),
        "not resumed after the outage"
    );
    assert!(cap.errors.is_empty(), "stream errors: {:?}", cap.errors);
    casd.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_transaction_open_across_the_start_is_not_missed() {
    let t = TestDb::new().await;
    let enc = encryptor(&t.db).await;
    let mut c = t.db.conn().await.unwrap();
    let (a, sec_a) = seal(&mut c, &enc, "open across start").await;
    let (b, sec_b) = seal(&mut c, &enc, "committed before start").await;
    let mut c1 = t.db.conn().await.unwrap();
    let mut tx1 = c1.start_transaction(Default::default()).await.unwrap();
    store(&mut tx1, a, &sec_a, "2033-01-01 00:00:00").await;
    store(&mut c, b, &sec_b, "2033-01-01 00:00:00").await;
    // The cycler loads now: B's event is above A's, A is invisible.
    let mut cap = Capture::bind(0x0101).await;
    let (casd, _) = start(&t.url, &cap).await;
    assert!(cap.until(LIMIT, |s| s == &sec_b[..]).await.is_some());
    tx1.commit().await.unwrap();
    assert!(
        cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some(),
        "an EMM committed after the load, below the watermark, was never played"
    );
    casd.shutdown().await.unwrap();
}

/// Two SimulCrypt outputs (versions 2 and 3, TS packets and sections) and
/// the UDP output at once, from one headend: the same EMM reaches all
/// three; on shutdown each MUX gets the orderly close.
#[tokio::test]
async fn two_simulcrypt_muxes_and_udp_at_once() {
    use carousel::simulcrypt::MessageType;
    use casd::config::{OutputConfig, OutputKind, SimulcryptConfig, SimulcryptPayload};
    use casd_tools::mux::{EventKind, MuxSim, MuxSimConfig};
    let t = TestDb::new().await;
    let enc = encryptor(&t.db).await;
    let mut c = t.db.conn().await.unwrap();
    let mut cap = Capture::bind(0x0101).await;
    let mut cfg = casd::testing::config(&t.url, cap.addr());
    let mut sims = Vec::new();
    for (i, version) in [2u8, 3].into_iter().enumerate() {
        let mut sc = MuxSimConfig::new("127.0.0.1:0".parse().unwrap());
        sc.version = version;
        let sim = MuxSim::start(sc).await.unwrap();
        cfg.cycler.outputs.push(OutputConfig {
            name: format!("mux{i}"),
            kind: OutputKind::Simulcrypt,
            bitrate: 500_000,
            simulcrypt: Some(SimulcryptConfig {
                mux: sim.addr(),
                data_udp: None,
                client_id: None,
                data_channel_id: 1,
                data_stream_id: 1,
                data_id: 1,
                protocol_version: version,
                payload: [SimulcryptPayload::TsPackets, SimulcryptPayload::Sections][i],
                keepalive_ms: 1000,
                response_timeout_ms: 2000,
                reconnect_min_ms: 100,
                reconnect_max_ms: 1000,
            }),
            ..OutputConfig::default()
        });
        sims.push(sim);
    }
    let casd = Running::start(cfg, vec![Role::Cycler]).await;
    let (a, sec_a) = seal(&mut c, &enc, "to every output").await;
    store(&mut c, a, &sec_a, "2033-01-01 00:00:00").await;
    assert!(cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some());
    for sim in &sims {
        let key = bytes::Bytes::from(sec_a.clone());
        let mut seen = false;
        for _ in 0..100 {
            seen = sim.with_probe(|p| p.sections().contains_key(&key));
            if seen {
                break;
            }
            sim.wait_for(Duration::from_millis(100), |_| false).await;
        }
        assert!(seen, "the EMM never reached {}", sim.addr());
        let bad: Vec<_> = sim
            .events()
            .into_iter()
            .filter(|e| matches!(e.kind, EventKind::Violation(..)))
            .collect();
        assert!(bad.is_empty(), "{bad:?}");
    }
    casd.shutdown().await.unwrap();
    for sim in &sims {
        let closed = sim
            .wait_for(LIMIT, |e| {
                [MessageType::StreamCloseRequest, MessageType::ChannelClose]
                    .iter()
                    .all(|t| e.iter().any(|x| x.kind == EventKind::Received(*t)))
            })
            .await;
        assert!(closed, "no orderly close: {:?}", sim.events());
    }
}
