//! Encryptor throughput, in process and through its REST endpoint over
//! loopback, for the closing notes of issue 4:
//!
//!     scripts/test.sh once (brings up MariaDB), then
//!     cargo bench --bench encryptor_rest
//!
//! Figures (medians of 5 runs of BENCH_SECONDS, default 3 s, each):
//! - seals/s through `LocalEncryptor::seal_batch` (batches of 1000 unique
//!   EMMs, ENTITLEMENT_ADD), one task;
//! - seals/s through `POST /encryptor/v1/seal` with 1000 jobs per request,
//!   one connection;
//! - seals/s with one job per request, 16 concurrent connections;
//! - baseline: requests/s of a trivial POST route on the same server stack
//!   with 16 connections (the HTTP ceiling of this machine), so the
//!   one-per-request figure can be read as a ratio of it.
//!
//! Run `openssl speed -seconds 3 -evp aes-128-ctr` and
//! `openssl speed -seconds 3 -cmac aes-128-cbc` in the same session for the
//! cipher baselines. Without `--bench` it runs a short smoke pass.

use std::sync::Arc;
use std::time::Instant;

use casd::encryptor::{Encryptor, LocalEncryptor, SealJob, SealResponse};
use casd::keystore::KeyStore;
use casd_wire::crypto::Key128;
use casd_wire::emm::{Address, CommandSpec, DeviceId, Entitlement};

fn job(i: u64) -> SealJob {
    SealJob {
        emm_id: i,
        issued_at: 1_700_000_000,
        not_after: 1_800_000_000,
        address: Address::Unique {
            device_id: DeviceId::new(1 + i % 1_000_000).unwrap(),
        },
        key_version: Some(1),
        commands: vec![CommandSpec::EntitlementAdd(Entitlement {
            product_id: 7,
            start: 1_700_000_000,
            end: 1_800_000_000,
        })],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn rate<F, Fut>(secs: f64, runs: usize, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let mut out = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed().as_secs_f64() < secs {
            n += f().await;
        }
        out.push(n as f64 / t.elapsed().as_secs_f64());
    }
    median(out)
}

async fn concurrent(
    secs: f64,
    runs: usize,
    conns: usize,
    make: impl Fn() -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> f64 {
    let make = Arc::new(make);
    let mut out = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let make = make.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while t.elapsed().as_secs_f64() < secs {
                    let r = make().send().await.expect("request");
                    assert!(r.status().is_success(), "{}", r.status());
                    let _ = r.bytes().await;
                    n += 1;
                }
                n
            }));
        }
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap();
        }
        out.push(n as f64 / t.elapsed().as_secs_f64());
    }
    median(out)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let secs: f64 = if bench {
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0)
    } else {
        0.2
    };
    let runs = if bench { 5 } else { 1 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t = casd::testing::TestDb::new().await;
        let ks = KeyStore::open(t.db.clone(), Key128::from_bytes([5; 16])).await.unwrap();
        ks.init().await.unwrap();
        let enc = Arc::new(LocalEncryptor::new(ks, 256));

        let batch: Vec<SealJob> = (0..1000).map(job).collect();
        let e = enc.clone();
        let b = batch.clone();
        let local = rate(secs, runs, move || {
            let (e, b) = (e.clone(), b.clone());
            async move { e.seal_batch(b).await.unwrap().len() as u64 }
        })
        .await;

        // As app::run serves it: behind the auth layer (16 MiB body limit
        // for the 1000-job batches; the trivial baseline route is outside).
        let auth = casd::auth::Auth::new(
            t.db.clone(),
            casd::auth::AuthSettings { signing_key_file: None, ..Default::default() },
        );
        let router = casd::auth::protect(casd::encryptor::routes(enc.clone()), auth, 16 << 20).merge(
            axum::Router::new().route(
                "/echo",
                axum::routing::post(|body: axum::body::Bytes| async move { body }),
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(casd::http::serve(listener, router, stop.clone()));
        let http = reqwest::Client::new();
        let token = casd::testing::bench_bearer(&t.db).await;
        let url = format!("http://{addr}/encryptor/v1/seal");
        let body = serde_json::to_vec(&serde_json::json!({ "jobs": batch })).unwrap();
        let (h, u, tk) = (http.clone(), url.clone(), token.clone());
        let batched = rate(secs, runs, move || {
            let (h, u, tk, body) = (h.clone(), u.clone(), tk.clone(), body.clone());
            async move {
                let r: SealResponse = h.post(u).header("authorization", tk).header("content-type", "application/json").body(body).send().await.unwrap().json().await.unwrap();
                r.results.len() as u64
            }
        })
        .await;
        let one = serde_json::to_vec(&serde_json::json!({ "jobs": [job(1)] })).unwrap();
        let (h, u, tk) = (http.clone(), url.clone(), token.clone());
        let single = concurrent(secs, runs, 16, move || h.post(&u).header("authorization", &tk).header("content-type", "application/json").body(one.clone())).await;
        let h = http.clone();
        let echo_url = format!("http://{addr}/echo");
        let echo_body = b"{\"jobs\":[]}".to_vec();
        let echo = concurrent(secs, runs, 16, move || h.post(&echo_url).body(echo_body.clone())).await;
        println!("encryptor in process (batches of 1000): {local:.0} seals/s");
        println!("encryptor REST, 1000 jobs per request:  {batched:.0} seals/s ({:.2} of in-process)", batched / local);
        println!("encryptor REST, 1 job per request, 16 connections: {single:.0} seals/s");
        println!("baseline: trivial POST, 16 connections: {echo:.0} requests/s (REST single / baseline = {:.2})", single / echo);
        stop.cancel();
    });
}
