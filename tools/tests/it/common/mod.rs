//! Shared by the casd-probe tests and the decode bench: hand-made streams
//! (sealed with casd-wire, packetized with the carousel crate) and running
//! the probe binary as a subprocess. The casd crate's tests that need a
//! running headend (`tests/probe_*.rs` there) include this file too.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command as Proc, Output};

use bytes::Bytes;
use carousel::{build_cat, CaDescriptor, Packetizer, Pid};
use casd_wire::crypto::{derive_duk, Key128};
use casd_wire::emm::{self, Address, Command, DeviceId, EmmId, Entitlement, SealInput};
use rand::rngs::OsRng;
use serde_json::Value;

pub const PMK: [u8; 16] = [0x11; 16];
pub const GK: [u8; 16] = [0x5A; 16];
pub const GLK: [u8; 16] = [0xA5; 16];
pub const DEVICE: u64 = 77;
pub const GROUP: u32 = 3;

pub fn hex16(k: &[u8; 16]) -> String {
    hex::encode(k)
}

pub fn ent() -> Entitlement {
    Entitlement {
        product_id: 42,
        start: 1_700_000_000,
        end: 1_800_000_000,
    }
}

pub fn seal(
    emm_id: u64,
    address: Address,
    key_version: u32,
    commands: Vec<Command>,
    root: &Key128,
) -> Bytes {
    let input = SealInput {
        emm_id: EmmId(emm_id),
        issued_at: 1_700_000_000,
        not_after: 2_000_000_000,
        address,
        key_version,
        commands,
    };
    Bytes::from(emm::seal_emm(&input, root, 256, &mut OsRng).expect("seal"))
}

/// A unique EMM for DEVICE delivering GK (group 3 v1) and GLK v1, a group
/// EMM under GK and a global EMM under GLK.
pub struct Fixture {
    pub unique: Bytes,
    pub group: Bytes,
    pub global: Bytes,
}

pub fn fixture() -> Fixture {
    let pmk = Key128::from_bytes(PMK);
    let duk = derive_duk(&pmk, DEVICE);
    let unique = seal(
        1,
        Address::Unique {
            device_id: DeviceId::new(DEVICE).unwrap(),
        },
        1,
        vec![
            Command::DeviceEnable,
            Command::GroupKey {
                group_id: GROUP,
                slot: 5,
                key_version: 1,
                activates_at: 1_700_000_000,
                key: Key128::from_bytes(GK),
            },
            Command::GlobalKey {
                key_version: 1,
                activates_at: 1_700_000_000,
                key: Key128::from_bytes(GLK),
            },
            Command::EntitlementAdd(ent()),
            Command::Osm {
                duration_s: 0,
                flags: 0,
                text: "x".repeat(60),
            },
        ],
        &duk,
    );
    let group = seal(
        2,
        Address::group_with_slots(GROUP, [5, 9]),
        1,
        vec![Command::EntitlementAdd(ent())],
        &Key128::from_bytes(GK),
    );
    let global = seal(
        3,
        Address::Global,
        1,
        vec![Command::Osm {
            duration_s: 10,
            flags: 1,
            text: "hello".into(),
        }],
        &Key128::from_bytes(GLK),
    );
    Fixture {
        unique,
        group,
        global,
    }
}

/// The headend's CAT: CA_system_ID 0x4AFF, EMMs on PID 0x0101.
pub fn cat_section() -> Bytes {
    let ca = CaDescriptor {
        ca_system_id: 0x4AFF,
        ca_pid: Pid::DEFAULT_EMM,
    };
    Bytes::from(build_cat(ca, 0).unwrap())
}

/// `cycles` passes over `sections` on PID 0x0101 with a CAT packet before
/// each pass, packed like the headend does.
pub fn stream(sections: &[Bytes], cycles: usize) -> Vec<[u8; 188]> {
    let cat = cat_section();
    let mut emm = Packetizer::new(Pid::DEFAULT_EMM, true);
    let mut catp = Packetizer::new(Pid::CAT, true);
    let mut out = Vec::new();
    let mut pkt = [0u8; 188];
    for _ in 0..cycles {
        let mut c = Some(cat.clone());
        while catp.next_packet(&mut pkt, || c.take()) {
            out.push(pkt);
        }
        let mut q: std::collections::VecDeque<Bytes> = sections.iter().cloned().collect();
        while emm.next_packet(&mut pkt, || q.pop_front()) {
            out.push(pkt);
        }
    }
    out
}

pub fn write_ts(path: &Path, packets: &[[u8; 188]]) {
    let bytes: Vec<u8> = packets.iter().flatten().copied().collect();
    std::fs::write(path, bytes).unwrap();
}

/// The casd-probe binary. Cargo names it to casd-tools' own tests; the casd
/// crate's tests build it once with cargo (casd-tools is not a dependency
/// that could give them the path).
pub fn probe_bin() -> &'static str {
    if let Some(bin) = option_env!("CARGO_BIN_EXE_casd-probe") {
        return bin;
    }
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(build_probe)
}

/// `cargo build -p casd-tools --bin casd-probe`, and the path of the
/// executable it reports.
fn build_probe() -> String {
    let out = Proc::new(env!("CARGO"))
        .args(["build", "--quiet", "--message-format=json"])
        .args(["-p", "casd-tools", "--bin", "casd-probe"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run cargo to build casd-probe");
    assert!(out.status.success(), "cargo build casd-probe failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "casd-probe")
        .and_then(|m| m["executable"].as_str().map(str::to_owned))
        .expect("cargo reported the casd-probe executable")
}

pub struct Run {
    pub out: Output,
    pub records: Vec<Value>,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn of_type(&self, ty: &str) -> Vec<&Value> {
        self.records.iter().filter(|r| r["type"] == ty).collect()
    }
    pub fn summary(&self) -> &Value {
        self.records
            .iter()
            .rev()
            .find(|r| r["type"] == "summary" && r["final"] == true)
            .unwrap_or_else(|| {
                panic!(
                    "no final summary; stdout: {}\nstderr: {}",
                    self.stdout(),
                    self.stderr()
                )
            })
    }
    pub fn errors(&self, kind: &str) -> u64 {
        self.summary()["errors"][kind].as_u64().unwrap()
    }
    /// EMM records by emm_id / table_id_extension.
    pub fn emm(&self, ext: u64) -> &Value {
        self.records
            .iter()
            .find(|r| r["type"] == "emm" && r["table_id_extension"] == ext)
            .unwrap_or_else(|| panic!("no EMM with ext {ext}: {}", self.stdout()))
    }
}

/// The probe on `input` (`--ts` or `--pcap`) `path` with `--json` and `args`.
pub fn probe_json(input: &str, path: &Path, args: &[&str]) -> Run {
    let path = path.to_str().expect("a UTF-8 temporary path");
    probe(&[&[input, path, "--json"], args].concat())
}

pub fn probe(args: &[&str]) -> Run {
    let out = Proc::new(probe_bin())
        .args(args)
        .output()
        .expect("run casd-probe");
    let records = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Run { out, records }
}
