//! Test support: a throwaway database per test, on the MariaDB that
//! `scripts/test.sh` brings up. Compiled only with the `testing` feature
//! (which the integration tests and benches enable through casd's
//! dev-dependency on itself), never into a release build.
//!
//! The server comes from `CASD_TEST_DATABASE_URL` (a `mysql://` URL without
//! a database), or from `.state/test-database-url` written by
//! `scripts/test.sh`, so a plain `cargo test` works after one bring-up.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mysql_async::prelude::*;

use crate::db::Db;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The MariaDB server URL for tests (no database part).
pub fn server_url() -> String {
    if let Ok(u) = std::env::var("CASD_TEST_DATABASE_URL") {
        return u.trim_end_matches('/').to_owned();
    }
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".state/test-database-url");
    match std::fs::read_to_string(&file) {
        Ok(u) => u.trim().trim_end_matches('/').to_owned(),
        Err(_) => panic!(
            "no test database: run the README's test command (scripts/test.sh), \
             or set CASD_TEST_DATABASE_URL=mysql://user:pw@127.0.0.1:port"
        ),
    }
}

/// The CA the test MariaDB's certificate chains to: `CASD_TEST_DATABASE_CA`
/// with `CASD_TEST_DATABASE_URL` (scripts/mariadb.sh exports both), or
/// `.state/mariadb-secrets/ca.pem` beside `.state/test-database-url`.
pub fn server_ca() -> Option<std::path::PathBuf> {
    if std::env::var_os("CASD_TEST_DATABASE_URL").is_some() {
        return std::env::var_os("CASD_TEST_DATABASE_CA").map(Into::into);
    }
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".state/mariadb-secrets/ca.pem");
    ca.exists().then_some(ca)
}

/// The `[database]` section of a test configuration for `url`: TLS
/// required and verified against [`server_ca`], as casd runs in
/// production; without a known CA, plain (said once, loudly).
pub fn database_toml(url: &str) -> String {
    static LOUD: std::sync::Once = std::sync::Once::new();
    match server_ca() {
        Some(ca) => format!(
            "[database]\nurl = \"{url}\"\ntls = \"required\"\ntls_ca = \"{}\"\n",
            ca.display()
        ),
        None => {
            LOUD.call_once(|| {
                eprintln!(
                    "casd testing: WARNING: no CA for the test MariaDB (CASD_TEST_DATABASE_CA): \
                     tests connect casd to it WITHOUT TLS (database.tls = \"disabled\")"
                )
            });
            format!("[database]\nurl = \"{url}\"\ntls = \"disabled\"\n")
        }
    }
}

/// A fresh database with every migration applied, dropped when this value
/// is dropped.
pub struct TestDb {
    pub db: Db,
    pub name: String,
    pub url: String,
    server: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let server = server_url();
        let name = format!(
            "casd_t_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let mut admin = mysql_async::Conn::new(
            mysql_async::Opts::from_url(&server)
                .expect("CASD_TEST_DATABASE_URL is not a mysql:// URL"),
        )
        .await
        .expect("cannot connect to the test MariaDB");
        admin
            .query_drop(format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
            .await
            .expect("create test database");
        let _ = admin.disconnect().await;
        let url = format!("{server}/{name}");
        let db = Db::new(&url, 16, Duration::from_secs(5)).expect("pool");
        db.migrate().await.expect("migrations apply");
        TestDb {
            db,
            name,
            url,
            server,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop may run inside a runtime: do the async cleanup on a thread of
        // its own with a small runtime, and wait for it.
        let server = self.server.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(opts) = mysql_async::Opts::from_url(&server) {
                    if let Ok(mut c) = mysql_async::Conn::new(opts).await {
                        let _ = c
                            .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                            .await;
                        let _ = c.disconnect().await;
                    }
                }
            });
        })
        .join();
    }
}

/// A TCP proxy on 127.0.0.1 in front of the test MariaDB that a test can
/// cut (every connection reset, the port closed) and restore on the same
/// port: "the database went away" without touching the shared server.
pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    target: std::net::SocketAddr,
    stop: std::sync::Mutex<Option<tokio_util::sync::CancellationToken>>,
}

impl TcpProxy {
    /// Starts a proxy to `target`.
    pub async fn start(target: std::net::SocketAddr) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let p = TcpProxy {
            addr,
            target,
            stop: std::sync::Mutex::new(None),
        };
        p.serve(listener);
        p
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let token = tokio_util::sync::CancellationToken::new();
        let target = self.target;
        let t = token.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = t.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => return },
                };
                let t = t.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = t.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                    // Dropping both streams resets the client's connection.
                });
            }
        });
        *self.stop.lock().expect("proxy lock") = Some(token);
    }

    /// Cuts every connection and stops listening.
    pub fn cut(&self) {
        if let Some(t) = self.stop.lock().expect("proxy lock").take() {
            t.cancel();
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind proxy port");
        self.serve(listener);
    }

    /// `url` (a mysql:// URL) with its host:port replaced by the proxy's.
    pub fn url_via(&self, url: &str) -> String {
        let at = url.rfind('@').map(|i| i + 1).unwrap_or("mysql://".len());
        let rest = &url[at..];
        let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("");
        format!("{}{}{}", &url[..at], self.addr, path)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// host:port of the test MariaDB.
pub fn server_addr() -> std::net::SocketAddr {
    let url = server_url();
    let at = url.rfind('@').map(|i| i + 1).unwrap_or("mysql://".len());
    let hostport = url[at..].split('/').next().unwrap_or("");
    hostport
        .parse()
        .expect("test database URL must use an IP:port")
}

/// A configuration for tests: plain HTTP, logs under a fresh temp dir, one
/// output to `destination` at 2 Mbit/s, fast-lane bursts 20 ms apart.
pub fn config(db_url: &str, destination: std::net::SocketAddr) -> crate::config::Config {
    let dir = std::env::temp_dir().join(format!(
        "casd-test-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = std::fs::create_dir_all(&dir);
    let text = format!(
        "{database}connect_timeout_s = 2\n\
         [api]\nplain_http = true\nrequest_log = \"{dir}/requests.jsonl\"\n\
         [keys]\nroot_key_file = \"{dir}/root.key\"\n\
         [emmg]\npoll_interval_ms = 50\n\
         [metrics]\nlisten = \"\"\n\
         [cycler]\npoll_interval_ms = 20\nburst_interval_ms = 20\nlog_file = \"{dir}/carousel.jsonl\"\n\
         [[cycler.outputs]]\nname = \"test\"\ndestination = \"{destination}\"\nbitrate = 2000000\n",
        database = database_toml(db_url),
        dir = dir.display()
    );
    crate::config::Config::from_toml_str(
        &text,
        std::path::Path::new("test.toml"),
        std::iter::empty(),
    )
    .expect("test config")
}

/// Receives the carousel's UDP output on 127.0.0.1 and reassembles the
/// sections of one PID, counting CC and CRC errors.
///
/// A thread of its own drains the socket into an unbounded queue as
/// datagrams arrive, so that a test busy elsewhere (posting commands,
/// waiting on a process) never lets the kernel's receive buffer overflow:
/// a CC error reported here is one the sender made, not one the test caused.
pub struct Capture {
    addr: std::net::SocketAddr,
    rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    depack: carousel::Depacketizer,
    pending: std::collections::VecDeque<bytes::Bytes>,
    pub datagrams: u64,
    pub errors: Vec<carousel::StreamError>,
    pub discontinuities: u64,
    /// Bytes of RTP header to skip at the start of each datagram.
    pub rtp_header: usize,
    /// Largest time between two datagrams' arrivals, in microseconds
    /// (measured by the receiving thread as they arrive).
    largest_gap_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Capture {
    pub async fn bind(pid: u16) -> Capture {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind capture");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("capture timeout");
        let addr = socket.local_addr().expect("capture addr");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let largest_gap_us = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let gap = largest_gap_us.clone();
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || {
                let mut buf = vec![0u8; 2048];
                let mut last: Option<std::time::Instant> = None;
                while !st.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let now = std::time::Instant::now();
                        if let Some(l) = last {
                            let us = now.duration_since(l).as_micros() as u64;
                            gap.fetch_max(us, std::sync::atomic::Ordering::Relaxed);
                        }
                        last = Some(now);
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            })
            .expect("capture thread");
        Capture {
            addr,
            rx,
            stop,
            depack: carousel::Depacketizer::new(carousel::Pid::new(pid).expect("pid")),
            pending: Default::default(),
            datagrams: 0,
            errors: Vec::new(),
            discontinuities: 0,
            rtp_header: 0,
            largest_gap_us,
        }
    }

    /// [`Capture::largest_gap`], and starts measuring anew from now.
    pub fn take_largest_gap(&self) -> Duration {
        Duration::from_micros(
            self.largest_gap_us
                .swap(0, std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// The largest time between two datagrams received so far (from the
    /// first datagram on, or since [`Capture::take_largest_gap`]).
    pub fn largest_gap(&self) -> Duration {
        Duration::from_micros(
            self.largest_gap_us
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The next EMM section on air, or `None` if nothing arrives within
    /// `limit` (a guard against a hung test, not a synchronisation).
    pub async fn next_section(&mut self, limit: Duration) -> Option<bytes::Bytes> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.pending.pop_front() {
                return Some(s);
            }
            let d = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()??;
            self.datagrams += 1;
            let payload = d.get(self.rtp_header..).unwrap_or(&[]);
            for pkt in payload.chunks(188) {
                for ev in self.depack.push(pkt) {
                    match ev {
                        carousel::Event::Section(s) => self.pending.push_back(s),
                        carousel::Event::Discontinuity => self.discontinuities += 1,
                        carousel::Event::Error(e) => self.errors.push(e),
                    }
                }
            }
        }
    }

    /// Reads sections until `pred` holds for one (returned), or `limit`.
    pub async fn until(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&[u8]) -> bool,
    ) -> Option<bytes::Bytes> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let s = self.next_section(left).await?;
            if pred(&s) {
                return Some(s);
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An `Authorization` header value accepted by routes served with
/// `auth::protect`/`auth::attach` on `db` (client `bench`, every scope).
pub async fn bench_bearer(db: &Db) -> String {
    crate::auth::testing::bench_bearer(db).await
}

/// A `Shared` for tests that drive a role's functions directly: the given
/// configuration and pool, a verify-only auth (no signing key), no
/// Encryptor unless given.
pub fn shared(
    cfg: crate::config::Config,
    db: Db,
    encryptor: Option<std::sync::Arc<dyn crate::encryptor::Encryptor>>,
) -> crate::app::Shared {
    crate::app::Shared {
        cfg: std::sync::Arc::new(cfg),
        db: db.clone(),
        readiness: Default::default(),
        shutdown: tokio_util::sync::CancellationToken::new(),
        work_ready: Default::default(),
        emms_ready: Default::default(),
        auth: crate::auth::Auth::new(
            db,
            crate::auth::AuthSettings {
                signing_key_file: None,
                ..Default::default()
            },
        ),
        encryptor,
        metrics: crate::metrics::Metrics::off(),
    }
}

/// Feeds captured sections to every reference receiver until `done` holds
/// for them (or `limit` passes: a guard, not a synchronisation), and checks
/// the stream had no CRC/CC error and no receiver rejected a section.
pub async fn air_until(
    cap: &mut Capture,
    rx: &mut std::collections::HashMap<u64, casd_wire::receiver::Receiver>,
    what: &str,
    limit: Duration,
    done: impl Fn(&std::collections::HashMap<u64, casd_wire::receiver::Receiver>) -> bool,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0);
    let deadline = tokio::time::Instant::now() + limit;
    while !done(rx) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let s = cap
            .next_section(left)
            .await
            .unwrap_or_else(|| panic!("never on air: {what}"));
        for r in rx.values_mut() {
            if let casd_wire::receiver::Outcome::Rejected(e) = r.accept(&s, now) {
                panic!("receiver {} rejected a section: {e}", r.device_id);
            }
        }
    }
    assert!(
        cap.errors.is_empty(),
        "stream errors (CRC/CC): {:?}",
        cap.errors
    );
}

/// A headend running inside the test's process with the roles asked for,
/// on a 127.0.0.1:0 listener bound first (so the address is known before
/// start-up), the way `casd run` assembles one.
pub struct Running {
    pub addr: std::net::SocketAddr,
    /// `http://addr`.
    pub base: String,
    pub stop: tokio_util::sync::CancellationToken,
    /// Where `GET /metrics` is served, when started with
    /// [`Running::start_with_metrics`].
    pub metrics: Option<std::net::SocketAddr>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Starts `crate::app::run` with `roles`; does not wait for readiness.
    pub async fn start(cfg: crate::config::Config, roles: Vec<crate::config::Role>) -> Running {
        Running::spawn(cfg, roles, false).await
    }

    /// [`Running::start`] with the metrics endpoint on a 127.0.0.1:0
    /// listener of its own (whatever `[metrics] listen` says).
    pub async fn start_with_metrics(
        cfg: crate::config::Config,
        roles: Vec<crate::config::Role>,
    ) -> Running {
        Running::spawn(cfg, roles, true).await
    }

    async fn spawn(
        cfg: crate::config::Config,
        roles: Vec<crate::config::Role>,
        metrics: bool,
    ) -> Running {
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let listener = bind().await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let (task, metrics) = if metrics {
            let m = bind().await.unwrap();
            let at = m.local_addr().unwrap();
            let run = crate::app::run_with_metrics(cfg, roles, listener, Some(m), stop.clone());
            (tokio::spawn(run), Some(at))
        } else {
            let run = crate::app::run(cfg, roles, listener, stop.clone());
            (tokio::spawn(run), None)
        };
        Running {
            addr,
            base: format!("http://{addr}"),
            stop,
            metrics,
            task,
        }
    }

    /// Polls `/readyz` (the thing that says so) until it answers 200 and
    /// returns its body; panics with the last answer after 30 s.
    pub async fn ready(&self) -> serde_json::Value {
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut last = String::from("no answer");
        while tokio::time::Instant::now() < deadline {
            match http.get(format!("{}/readyz", self.base)).send().await {
                Ok(r) if r.status() == 200 => return r.json().await.unwrap(),
                Ok(r) => last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{}/readyz never answered 200; last: {last}", self.base);
    }

    /// Stops it (graceful drain) and returns how `app::run` ended.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.expect("app::run panicked")
    }
}

/// A private MariaDB server for a test that needs one of its own (its
/// files searched, a backup taken, TLS off), never the shared test server:
/// brought up by scripts/mariadb.sh's `casd_mariadb_instance_up`, so with
/// the scripts' own options (encrypted at rest, TLS with the CA made in
/// its temporary directory). The server is killed on drop; the directory
/// is removed when the first instance made in it is dropped.
pub struct MariaDbInstance {
    /// The instance directory (`data/`, `my.cnf`, `mysqld.sock`, ...).
    pub dir: std::path::PathBuf,
    /// `mysql://casd:…@127.0.0.1:<port>`, no database.
    pub server_url: String,
    pub port: u16,
    pid: i32,
    owns_root: bool,
}

/// Runs `scripts/<script>` (a file, or mariadb.sh's function `call`).
fn run_script(script: &str, call: Option<&str>, args: &[&str]) -> std::process::Output {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let mut cmd = std::process::Command::new("bash");
    match call {
        Some(f) => cmd
            .arg("-c")
            .arg(format!(". \"$0\" && {f} \"$@\""))
            .arg(&path),
        None => cmd.arg(&path),
    };
    let out = cmd.args(args).output().expect("run bash");
    assert!(
        out.status.success(),
        "scripts/{script} {call:?} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

impl MariaDbInstance {
    /// A new server in a new temporary directory; `extra` are further
    /// mariadbd options (e.g. `--skip-ssl`).
    pub fn start(extra: &[&str]) -> MariaDbInstance {
        let root = std::env::temp_dir().join(format!(
            "casd-mariadb-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let dir = root.join("server");
        let port = free_port().to_string();
        let mut args = vec![dir.to_str().expect("utf-8 temp dir"), &port, "1"];
        args.extend_from_slice(extra);
        run_script("mariadb.sh", Some("casd_mariadb_instance_up"), &args);
        MariaDbInstance::adopt(dir, true)
    }

    /// A fresh instance beside this one (so with the same key file and CA)
    /// restored from `backup` by scripts/mariadb-backup.sh.
    pub fn restore(&self, backup: &std::path::Path) -> MariaDbInstance {
        let dir = self.dir.with_file_name("restored");
        let port = free_port().to_string();
        let args = [
            "restore",
            backup.to_str().expect("utf-8 path"),
            dir.to_str().expect("utf-8 path"),
            &port,
        ];
        run_script("mariadb-backup.sh", None, &args);
        // Same users and passwords as the backed-up server.
        let url = self
            .server_url
            .replace(&format!(":{}", self.port), &format!(":{port}"));
        std::fs::write(dir.join("server-url"), url).expect("write server-url");
        MariaDbInstance::adopt(dir, false)
    }

    fn adopt(dir: std::path::PathBuf, owns_root: bool) -> MariaDbInstance {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .unwrap_or_else(|e| panic!("{}/{f}: {e}", dir.display()))
                .trim()
                .to_owned()
        };
        let server_url = read("server-url");
        let port = server_url.rsplit(':').next().and_then(|p| p.parse().ok());
        MariaDbInstance {
            port: port.expect("port in server-url"),
            pid: read("mysqld.pid").parse().expect("pid"),
            server_url,
            dir,
            owns_root,
        }
    }

    /// The CA its certificate chains to (`database.tls_ca`).
    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.with_file_name("mariadb-secrets").join("ca.pem")
    }

    /// `scripts/mariadb-backup.sh backup` of the running server in `dir`
    /// (an instance's) into `target` (a directory that does not exist yet).
    pub fn backup_dir(dir: &std::path::Path, target: &std::path::Path) {
        let args = [
            "backup",
            dir.to_str().expect("utf-8 path"),
            target.to_str().expect("utf-8 path"),
        ];
        run_script("mariadb-backup.sh", None, &args);
    }
}

impl Drop for MariaDbInstance {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        let _ = kill(nix::unistd::Pid::from_raw(self.pid), Signal::SIGKILL);
        if self.owns_root {
            if let Some(root) = self.dir.parent() {
                let _ = std::fs::remove_dir_all(root);
            }
        }
    }
}

/// A private MariaDB replication group for tests that kill servers
/// (never the shared test server): brought up by scripts/mariadb.sh's
/// `casd_mariadb_pair_up` (so its server options are the scripts' own),
/// in a temporary directory removed on drop, both servers stopped.
pub mod mariadb {
    use std::path::PathBuf;
    use std::process::Command;
    use std::time::Duration;

    /// Primary `a` + semi-synchronous replica `b`.
    pub struct Pair {
        pub dir: PathBuf,
        /// `mysql://casd:…@127.0.0.1:<a>/casd`
        pub url: String,
        /// `127.0.0.1:<a>`, `127.0.0.1:<b>`.
        pub servers: Vec<String>,
    }

    fn bash(call: &str, args: &[&str]) {
        super::run_script("mariadb.sh", Some(call), args);
    }

    impl Pair {
        /// Brings the pair up; `semi_sync_timeout_ms` is the primary's
        /// rpl_semi_sync_master_timeout.
        pub fn up(semi_sync_timeout_ms: u32) -> Pair {
            let dir = std::env::temp_dir().join(format!(
                "casd-pair-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            let d = dir.to_str().expect("utf-8 temp dir").to_owned();
            bash(
                "casd_mariadb_pair_up",
                &[&d, &semi_sync_timeout_ms.to_string()],
            );
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .unwrap_or_else(|e| panic!("{f}: {e}"))
                    .trim()
                    .to_owned()
            };
            let url = read("url");
            let servers = read("servers").split(',').map(str::to_owned).collect();
            Pair { dir, url, servers }
        }

        /// The CA both members' certificates chain to (`database.tls_ca`).
        pub fn ca(&self) -> PathBuf {
            self.dir.join("mariadb-secrets").join("ca.pem")
        }

        /// TLS to the members, verified against [`Pair::ca`].
        pub fn tls(&self) -> crate::db::DbTls {
            crate::db::DbTls::Required {
                ca: Some(self.ca()),
            }
        }

        /// The administrator's password file (for `casd db promote`).
        pub fn admin_password_file(&self) -> PathBuf {
            self.dir.join("admin.password")
        }

        /// SIGKILL to member `m` ("a" or "b"); returns once its port
        /// refuses connections.
        pub fn kill9(&self, m: &str) {
            let pid: i32 = std::fs::read_to_string(self.dir.join(m).join("mysqld.pid"))
                .expect("pid file")
                .trim()
                .parse()
                .expect("pid");
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
                .expect("kill -9");
            let port = self.port(m);
            for _ in 0..1000 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10)); // polling a process's exit
            }
            panic!("member {m} still listens 10 s after SIGKILL");
        }

        /// Starts member `m` again on its data (read-only, as every start).
        pub fn restart(&self, m: &str) {
            let d = self.dir.join(m);
            let id = if m == "a" { "1" } else { "2" };
            bash("casd_mariadb_member_start", &[d.to_str().unwrap(), id]);
        }

        pub fn port(&self, m: &str) -> u16 {
            std::fs::read_to_string(self.dir.join(m).join("port"))
                .expect("port file")
                .trim()
                .parse()
                .expect("port")
        }

        /// Runs `sql` on member `m` as its root (the socket), returns the
        /// output (tab-separated, no headers).
        pub fn sql(&self, m: &str, sql: &str) -> String {
            let out = Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!(
                    "--socket={}",
                    self.dir.join(m).join("mysqld.sock").display()
                ))
                .args(["-uroot", "-N", "-B", "-e", sql])
                .output()
                .expect("run the mariadb client");
            assert!(
                out.status.success(),
                "{sql} on {m}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }

        /// `mysql://casd:…@127.0.0.1:<m>/casd`: the casd user on one member.
        pub fn url_of(&self, m: &str) -> String {
            let at = self.url.rfind(':').expect("port in url");
            format!("{}:{}/casd", &self.url[..at], self.port(m))
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            for m in ["a", "b"] {
                if let Ok(p) = std::fs::read_to_string(self.dir.join(m).join("mysqld.pid")) {
                    if let Ok(pid) = p.trim().parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
