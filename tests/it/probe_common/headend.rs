//! A real headend for the tests: a TestDb with a key store, EMMs sealed by
//! the LocalEncryptor and stored through the EMM store (as the EMMG stores
//! them), and the Cycler role started with `casd::app::run`.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command as Proc, Stdio};
use std::time::Duration;

use casd::config::Role;
use casd::emm_store::{self, NewEmm, Purpose, Review};
use casd::encryptor::{Encryptor, LocalEncryptor, SealJob};
use casd::keystore::{KeyKind, KeyStore};
use casd::testing::{Running, TestDb};
use casd_wire::crypto::Key128;
use casd_wire::emm::{Address, CommandSpec, DeviceId};
use mysql_async::prelude::*;
use serde_json::{json, Value};

pub struct Stored {
    pub id: u64,
    pub section: Vec<u8>,
    pub specs: Vec<CommandSpec>,
    pub address: Address,
}

impl Stored {
    /// The commands as the probe prints them (keys redacted).
    pub fn expected_commands(&self) -> Value {
        Value::Array(
            self.specs
                .iter()
                .map(|s| {
                    let mut v = serde_json::to_value(s).unwrap();
                    if matches!(
                        s,
                        CommandSpec::GroupKey { .. } | CommandSpec::GlobalKey { .. }
                    ) {
                        v["key"] = json!("<redacted, 16 bytes>");
                    }
                    v
                })
                .collect(),
        )
    }
}

pub struct Headend {
    pub t: TestDb,
    pub enc: LocalEncryptor,
    pub pmk: Key128,
}

pub const DEVICE: u64 = 77;
pub const GROUP: u32 = 3;

impl Headend {
    pub async fn new() -> Headend {
        let t = TestDb::new().await;
        let ks = KeyStore::open(t.db.clone(), Key128::from_bytes([1; 16]))
            .await
            .unwrap();
        ks.init().await.unwrap();
        let pmk = (*ks.key(KeyKind::Pmk, 1).await.unwrap()).clone();
        Headend {
            enc: LocalEncryptor::new(ks, 256),
            t,
            pmk,
        }
    }

    pub fn pmk_hex(&self) -> String {
        hex::encode(self.pmk.expose())
    }

    /// (group key, global key) currently in use, as hex.
    pub async fn gk_glk_hex(&self) -> ((u32, String), (u32, String)) {
        let ks = self.enc.keystore();
        let g = self.enc.current_key(KeyKind::Group(GROUP)).await.unwrap();
        let l = self.enc.current_key(KeyKind::Global).await.unwrap();
        let gk = ks.key(KeyKind::Group(GROUP), g.version).await.unwrap();
        let glk = ks.key(KeyKind::Global, l.version).await.unwrap();
        (
            (g.version, hex::encode(gk.expose())),
            (l.version, hex::encode(glk.expose())),
        )
    }

    /// Seals one EMM; `event` = false leaves the carousel uninformed (the
    /// row is live in the table but the Cycler never hears of it).
    pub async fn store(&self, address: Address, specs: Vec<CommandSpec>, event: bool) -> Stored {
        let mut c = self.t.db.conn().await.unwrap();
        let id: u64 = c
            .query_first("SELECT NEXTVAL(emm_id_seq)")
            .await
            .unwrap()
            .unwrap();
        let (job_issued_at, job_not_after) = (1_700_000_000, 2_000_000_000);
        let job = SealJob {
            emm_id: id,
            issued_at: job_issued_at,
            not_after: job_not_after,
            address: address.clone(),
            key_version: None,
            commands: specs.clone(),
        };
        let s = self
            .enc
            .seal_batch(vec![job])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        let purpose = match specs.first() {
            Some(CommandSpec::DeviceEnable {}) => Purpose::DeviceEnable,
            Some(CommandSpec::EntitlementSet { .. }) => Purpose::EntitlementSet,
            _ => Purpose::Osm,
        };
        let emm = NewEmm {
            request_id: None,
            class: carousel::Class::Change,
            purpose,
            review: Review {
                address: address.clone(),
                commands: specs.clone(),
                emm_id: id,
                issued_at: job_issued_at,
                key_version: s.key_version,
                not_after: job_not_after,
                resealed_from: None,
            },
            section: s.section.clone(),
            // Stored the way the EMMG stores it; without its event, stored
            // withdrawn (never announced) and then made live behind the
            // carousel's back, as a lost event would leave it.
            live: event,
        };
        emm_store::insert(&mut c, &[emm], time::OffsetDateTime::now_utc())
            .await
            .unwrap();
        if !event {
            c.exec_drop("UPDATE emms SET state = 'live' WHERE id = ?", (id,))
                .await
                .unwrap();
        }
        Stored {
            id,
            section: s.section,
            specs,
            address,
        }
    }

    /// A unique EMM delivering GK/GLK, a group EMM and a global EMM.
    pub async fn store_three(&self) -> Vec<Stored> {
        let g = self.enc.current_key(KeyKind::Group(GROUP)).await.unwrap();
        let l = self.enc.current_key(KeyKind::Global).await.unwrap();
        let ent = casd_wire::emm::Entitlement {
            product_id: 42,
            start: 1_700_000_000,
            end: 1_800_000_000,
        };
        vec![
            self.store(
                Address::Unique {
                    device_id: DeviceId::new(DEVICE).unwrap(),
                },
                vec![
                    CommandSpec::DeviceEnable {},
                    CommandSpec::GroupKey {
                        group_id: GROUP,
                        slot: 5,
                        key_version: g.version,
                        activates_at: g.activates_at,
                        key: (),
                    },
                    CommandSpec::GlobalKey {
                        key_version: l.version,
                        activates_at: l.activates_at,
                        key: (),
                    },
                    CommandSpec::EntitlementAdd(ent),
                ],
                true,
            )
            .await,
            self.store(
                Address::group_with_slots(GROUP, [5, 9]),
                vec![CommandSpec::EntitlementSet { entries: vec![ent] }],
                true,
            )
            .await,
            self.store(
                Address::Global,
                vec![CommandSpec::Osm {
                    duration_s: 10,
                    flags: casd_wire::emm::OSM_FLAG_FORCED,
                    text: "on air".into(),
                }],
                true,
            )
            .await,
        ]
    }

    /// Starts the Cycler role with the test config (2 Mbit/s to `dest`)
    /// changed by `tweak`.
    pub async fn start_cycler(
        &self,
        dest: SocketAddr,
        tweak: impl FnOnce(&mut casd::config::Config),
    ) -> Running {
        let mut cfg = casd::testing::config(&self.t.url, dest);
        tweak(&mut cfg);
        Running::start(cfg, vec![Role::Cycler]).await
    }
}

/// A free UDP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the probe with JSON output and waits (reading its first line,
/// not sleeping) until it says it is listening.
pub fn spawn_probe(args: &[&str]) -> (Child, std::io::BufReader<std::process::ChildStdout>) {
    let mut child = Proc::new(super::probe_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn casd-probe");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let v: Value = serde_json::from_str(&first).unwrap_or_else(|_| panic!("first line {first:?}"));
    assert_eq!(v["type"], "start", "{v}");
    (child, out)
}

/// Waits for a spawned probe (at most `limit`, a guard against a hung
/// test, then it is killed and the test fails) and parses its records.
pub async fn finish_probe(
    mut child: Child,
    mut out: std::io::BufReader<std::process::ChildStdout>,
    limit: Duration,
) -> super::Run {
    let id = child.id();
    let waiter = tokio::task::spawn_blocking(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let mut stderr = Vec::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_end(&mut e, &mut stderr).unwrap();
        }
        let status = child.wait().unwrap();
        (rest, stderr, status)
    });
    let (rest, stderr, status) = match tokio::time::timeout(limit, waiter).await {
        Ok(r) => r.unwrap(),
        Err(_) => {
            let _ = Proc::new("kill").arg(id.to_string()).status();
            panic!("casd-probe (pid {id}) did not finish within {limit:?}");
        }
    };
    let records = rest
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    super::Run {
        out: std::process::Output {
            status,
            stdout: rest.into_bytes(),
            stderr,
        },
        records,
    }
}
