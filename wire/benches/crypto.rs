//! EMM seal / open throughput on one core.
//!
//! `cargo bench -p casd-wire --bench crypto -- --warm-up-time 1 --measurement-time 3`
//! Criterion prints `thrpt` in elements/s = seals (or opens) per second of
//! wall time. On a shared machine wall time includes waiting for a core, so
//! a second report follows: operations per second of this thread's own CPU
//! time (from `/proc/thread-self/schedstat`), i.e. what one core delivers.

use casd_wire::crypto::{self, Key128};
use casd_wire::emm::{self, Address, Command, DeviceId, EmmId, Entitlement, SealInput};
use criterion::{black_box, criterion_group, Criterion, Throughput};
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

/// Nanoseconds this thread has spent on a CPU (Linux schedstat field 1).
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn per_cpu_second(name: &str, mut op: impl FnMut()) {
    // Warm up, then run for about one second of wall time.
    for _ in 0..10_000 {
        op();
    }
    let (Some(cpu0), wall0) = (thread_cpu_ns(), std::time::Instant::now()) else {
        println!("cpu-time {name}: /proc/thread-self/schedstat unavailable");
        return;
    };
    let mut n = 0u64;
    while wall0.elapsed() < std::time::Duration::from_secs(1) {
        for _ in 0..1_000 {
            op();
        }
        n += 1_000;
    }
    let wall = wall0.elapsed().as_secs_f64();
    let cpu = (thread_cpu_ns().unwrap_or(cpu0) - cpu0) as f64 / 1e9;
    println!(
        "cpu-time {name:<36} {:>10.0} ops per CPU-second ({:>8.0} ns/op CPU; {:>10.0} ops/s wall, {:.0}% of a core)",
        n as f64 / cpu,
        cpu * 1e9 / n as f64,
        n as f64 / wall,
        100.0 * cpu / wall
    );
}

fn cpu_time_report() {
    let mut rng = StdRng::from_rng(OsRng).expect("seed");
    let pmk = Key128::random(&mut rng);
    let duk = crypto::derive_duk(&pmk, 123_456);
    let input = unique_input(123_456);
    let section = emm::seal_emm(&input, &duk, 256, &mut rng).expect("seal");
    let global = SealInput {
        address: Address::Global,
        ..unique_input(1)
    };
    let glk = Key128::random(&mut rng);
    let keys = global.section_keys(&glk).expect("keys");
    per_cpu_second("seal_unique_with_duk_derivation", || {
        let duk = crypto::derive_duk(&pmk, 123_456);
        black_box(emm::seal_emm(black_box(&input), &duk, 256, &mut rng).expect("seal"));
    });
    per_cpu_second("seal_unique", || {
        black_box(emm::seal_emm(black_box(&input), &duk, 256, &mut rng).expect("seal"));
    });
    per_cpu_second("seal_unique_osrng", || {
        black_box(emm::seal_emm(black_box(&input), &duk, 256, &mut OsRng).expect("seal"));
    });
    per_cpu_second("seal_global_cached_keys", || {
        black_box(emm::seal_emm_with_keys(black_box(&global), &keys, 256, &mut rng).expect("seal"));
    });
    per_cpu_second("open_unique", || {
        black_box(emm::open_emm(black_box(&section), &duk).expect("open"));
    });
}

fn main() {
    crypto_benches();
    Criterion::default().configure_from_args().final_summary();
    // Only under `cargo bench` (which passes `--bench`); `cargo test
    // --benches` runs each benchmark once and skips the report.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list") {
        cpu_time_report();
    }
}
