//! EMM seal / open throughput on one core.
//!
//! `cargo bench --bench crypto -- --warm-up-time 1 --measurement-time 3`
//! Criterion prints `thrpt` in elements/s = seals (or opens) per second.

use casd::crypto::{self, Key128};
use casd::emm::{self, Address, Command, DeviceId, EmmId, Entitlement, SealInput};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::{OsRng, StdRng};
use rand::SeedableRng;

fn unique_input(device: u64) -> SealInput {
    SealInput {
        emm_id: EmmId(1_000_000),
        issued_at: 1_767_225_600,
        not_after: 1_769_817_600,
        address: Address::Unique {
            device_id: DeviceId::new(device).expect("valid"),
        },
        key_version: 1,
        // 16-byte header + 15-byte TLV = 31-byte plaintext, 112-byte section.
        commands: vec![Command::EntitlementAdd(Entitlement {
            product_id: 101,
            start: 1_767_225_600,
            end: 1_798_761_600,
        })],
    }
}

fn benches(c: &mut Criterion) {
    let mut rng = StdRng::from_rng(OsRng).expect("seed");
    let pmk = Key128::random(&mut rng);
    let duk = crypto::derive_duk(&pmk, 123_456);
    let input = unique_input(123_456);

    let mut g = c.benchmark_group("emm");
    g.throughput(Throughput::Elements(1));

    // What the Encryptor does per unique EMM when the DUK is not cached:
    // DUK = KDF(PMK, device), then seal (KDF for K_wrap/K_mac, wrap, CTR, CMAC, CRC).
    g.bench_function("seal_unique_with_duk_derivation", |b| {
        b.iter(|| {
            let duk = crypto::derive_duk(&pmk, 123_456);
            emm::seal_emm(black_box(&input), &duk, 256, &mut rng).expect("seal")
        })
    });
    g.bench_function("seal_unique", |b| {
        b.iter(|| emm::seal_emm(black_box(&input), &duk, 256, &mut rng).expect("seal"))
    });
    // The same with the OS CSPRNG called directly for IV and DEK (two getrandom calls).
    g.bench_function("seal_unique_osrng", |b| {
        b.iter(|| emm::seal_emm(black_box(&input), &duk, 256, &mut OsRng).expect("seal"))
    });

    let global = SealInput {
        address: Address::Global,
        ..unique_input(1)
    };
    let glk = Key128::random(&mut rng);
    let keys = global.section_keys(&glk).expect("keys");
    g.bench_function("seal_global_cached_keys", |b| {
        b.iter(|| emm::seal_emm_with_keys(black_box(&global), &keys, 256, &mut rng).expect("seal"))
    });

    let section = emm::seal_emm(&input, &duk, 256, &mut rng).expect("seal");
    g.bench_function("open_unique", |b| {
        b.iter(|| emm::open_emm(black_box(&section), &duk).expect("open"))
    });

    let root = Key128::random(&mut rng);
    g.bench_function("seal_key_at_rest", |b| {
        b.iter(|| crypto::seal_key_at_rest(&root, 1, black_box(42), &pmk, &mut rng))
    });
    let blob = crypto::seal_key_at_rest(&root, 1, 42, &pmk, &mut rng);
    g.bench_function("open_key_at_rest", |b| {
        b.iter(|| crypto::open_key_at_rest(&root, 42, black_box(&blob)).expect("open"))
    });
    g.finish();

    let mut p = c.benchmark_group("primitives");
    p.throughput(Throughput::Elements(1));
    p.bench_function("derive_duk", |b| {
        b.iter(|| crypto::derive_duk(&pmk, black_box(7)))
    });
    p.bench_function("derive_emm_keys_unique", |b| {
        b.iter(|| crypto::derive_emm_keys(&duk, 0x82, black_box(&7u64.to_be_bytes())))
    });
    p.finish();
}

criterion_group!(crypto_benches, benches);
criterion_main!(crypto_benches);
