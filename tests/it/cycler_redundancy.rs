//! Redundant Cyclers: two real `casd` processes (cycler role) in one
//! redundancy group serve one UDP output. One is on air, the other a hot
//! standby that sends nothing. The one on air is killed with SIGKILL under
//! a steady carousel: the standby is on air within 2 s, the stream has no
//! continuity error but the flagged discontinuity of the takeover, and
//! every live EMM is on air again.

use crate::common;
use crate::cycler::{encryptor, seal, store};

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carousel::{Depacketizer, Event, Pid, StreamError};
use casd::testing::TestDb;
use mysql_async::prelude::*;

const LIMIT: Duration = Duration::from_secs(20);
const EMMS: usize = 30;

/// One datagram as it arrived: when, from which sender port, the bytes.
type Arrival = (Instant, u16, Vec<u8>);

/// Records every datagram to a 127.0.0.1 socket, from a thread of its own
/// (so the receive buffer never overflows while the test waits elsewhere).
struct Recorder {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Arrival>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Recorder {
    fn start() -> Recorder {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let arrival = (Instant::now(), from.port(), buf[..n].to_vec());
                    g.lock().unwrap().push(arrival);
                }
            }
        });
        Recorder { addr, got, stop }
    }
    fn arrivals(&self) -> Vec<Arrival> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

struct Cycler {
    metrics: u16,
    child: Child,
}

impl Cycler {
    fn start(dir: &Path, name: &str, db_url: &str, dest: SocketAddr) -> Cycler {
        let metrics = common::free_port();
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let config = d.join("casd.toml");
        std::fs::write(
            &config,
            format!(
                "{database}connect_timeout_s = 2\n\
                 [api]\nlisten = \"127.0.0.1:{api}\"\nplain_http = true\nrequest_log = \"{d}/req.jsonl\"\n\
                 [keys]\nroot_key_file = \"{d}/root.key\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
                 [cycler]\npoll_interval_ms = 20\nlog_file = \"{d}/car.jsonl\"\n\
                 redundancy_group = \"studio\"\nlease_ms = 1000\n\
                 [[cycler.outputs]]\nname = \"main\"\ndestination = \"{dest}\"\nbitrate = 1000000\ncbr = true\n",
                database = casd::testing::database_toml(db_url),
                api = common::free_port(),
                d = d.display(),
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_casd"))
            // The test command exports the run database URL; the child uses its config file.
            .env_remove("CASD_DATABASE_URL")
            .arg("--config")
            .arg(&config)
            .args(["run", "--roles", "cycler"])
            .env("CASD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start casd");
        Cycler { metrics, child }
    }

    /// `casd_cycler_on_air` from its metrics endpoint (None: not up yet).
    async fn on_air(&mut self) -> Option<bool> {
        assert!(self.child.try_wait().unwrap().is_none(), "a cycler exited");
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics);
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("casd_cycler_on_air{"))?;
        Some(line.ends_with(" 1"))
    }

    fn metric(text: &str, name: &str) -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.rsplit(' ').next()?.parse().ok()
    }
}

impl Drop for Cycler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The EMM sections of `arrivals` (EMM PID 0x0101).
fn emm_ids<'a>(arrivals: impl Iterator<Item = &'a Arrival>) -> BTreeSet<Vec<u8>> {
    let mut d = Depacketizer::new(Pid::DEFAULT_EMM);
    let mut ids = BTreeSet::new();
    for (_, _, bytes) in arrivals {
        for p in bytes.chunks(188) {
            for ev in d.push(p) {
                if let Event::Section(s) = ev {
                    ids.insert(s.to_vec());
                }
            }
        }
    }
    ids
}

/// Polls (another process's state) until `f` holds or LIMIT passes.
async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let end = Instant::now() + LIMIT;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling other processes
    }
}

/// Every PID's stream, datagram by datagram in arrival order: no error
/// but the section the killed one cut short, a flagged discontinuity at
/// the first datagram of the new sender on each PID.
fn check_continuity(arrivals: &[Arrival], first_new: usize) {
    for pid in [Pid::DEFAULT_EMM, Pid::CAT] {
        let mut d = Depacketizer::new(pid);
        let mut flagged_at = Vec::new();
        for (i, (_, _, bytes)) in arrivals.iter().enumerate() {
            for p in bytes.chunks(188) {
                for ev in d.push(p) {
                    match ev {
                        Event::Discontinuity => flagged_at.push(i),
                        Event::Error(StreamError::TruncatedSection { .. }) if i >= first_new => {
                            assert_eq!(
                                flagged_at.last(),
                                Some(&i),
                                "PID {pid}: a cut section not at the takeover"
                            );
                        }
                        Event::Error(e) => panic!("PID {pid}: datagram {i}: {e}"),
                        Event::Section(_) => {}
                    }
                }
            }
        }
        // Once at the first start of the first sender, once at the takeover.
        assert_eq!(
            flagged_at.len(),
            2,
            "PID {pid}: discontinuities at {flagged_at:?}"
        );
        assert!(
            flagged_at[1] >= first_new && flagged_at[1] < first_new + 3,
            "PID {pid}: the takeover's discontinuity at datagram {}, the new sender from {first_new}",
            flagged_at[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_cycler_on_air_hands_over_within_2_s() {
    let t = TestDb::new().await;
    let enc = encryptor(&t.db).await;
    let mut c = t.db.conn().await.unwrap();
    let mut live = BTreeSet::new();
    for i in 0..EMMS {
        let (id, section) = seal(&mut c, &enc, &format!("steady {i}")).await;
        store(&mut c, id, &section, "2033-01-01 00:00:00").await;
        live.insert(section);
    }
    let rec = Recorder::start();
    let dir = std::env::temp_dir().join(format!("casd-redundant-{:08x}", rand::random::<u32>()));
    let mut cyclers = [
        Cycler::start(&dir, "a", &t.url, rec.addr),
        Cycler::start(&dir, "b", &t.url, rec.addr),
    ];

    // One goes on air, the other stays standby and sends nothing.
    let active = until("one cycler on air", async || {
        let a = cyclers[0].on_air().await?;
        let b = cyclers[1].on_air().await?;
        (a != b).then_some(if a { 0 } else { 1 })
    })
    .await;
    // The carousel is steady: every live EMM on air from the one sender.
    until("every EMM on air", async || {
        (emm_ids(rec.arrivals().iter()) == live).then_some(())
    })
    .await;
    let before = rec.arrivals();
    let old_port = before[0].1;
    assert!(before.iter().all(|a| a.1 == old_port), "the standby sent");

    let killed_at = Instant::now();
    cyclers[active].child.kill().unwrap(); // SIGKILL
    cyclers[active].child.wait().unwrap();
    let standby = 1 - active;
    let first_new = until("the standby on air", async || {
        rec.arrivals().iter().position(|a| a.1 != old_port)
    })
    .await;
    // Every live EMM again, from the new sender.
    until("every EMM on air after the takeover", async || {
        let all = rec.arrivals();
        (emm_ids(all[first_new..].iter()) == live).then_some(())
    })
    .await;

    let all = rec.arrivals();
    let new_port = all[first_new].1;
    assert!(
        all[first_new..].iter().all(|a| a.1 == new_port),
        "the killed one sent after the takeover"
    );
    let gap = all[first_new].0 - all[first_new - 1].0;
    let takeover = all[first_new].0.saturating_duration_since(killed_at);
    println!(
        "redundancy: gap on air {gap:?}, kill -9 to the standby's first datagram {takeover:?}"
    );
    assert!(gap < Duration::from_secs(2), "gap on air {gap:?}");
    check_continuity(&all, first_new);

    let text = reqwest::get(format!(
        "http://127.0.0.1:{}/metrics",
        cyclers[standby].metrics
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert_eq!(Cycler::metric(&text, "casd_cycler_on_air{"), Some(1.0));
    assert_eq!(
        Cycler::metric(&text, "casd_cycler_takeovers_total{"),
        Some(1.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A throwaway database with one live EMM: (database, a connection, its section).
async fn one_live_emm(text: &str) -> (TestDb, mysql_async::Conn, Vec<u8>) {
    let t = TestDb::new().await;
    let enc = encryptor(&t.db).await;
    let mut c = t.db.conn().await.unwrap();
    let (id, section) = seal(&mut c, &enc, text).await;
    store(&mut c, id, &section, "2033-01-01 00:00:00").await;
    (t, c, section)
}

/// The database gone while on air: the holder keeps playing past its
/// lease's expiry (no other instance could take the lease without the
/// database either), and renews it once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_keeps_playing_while_the_database_is_away() {
    use casd::testing::{Capture, Running, TcpProxy};

    let (t, mut c, sec_a) = one_live_emm("keeps playing").await;
    let proxy = TcpProxy::start(casd::testing::server_addr()).await;
    let mut cap = Capture::bind(0x0101).await;
    let mut cfg = casd::testing::config(&proxy.url_via(&t.url), cap.addr());
    cfg.cycler.redundancy_group = "solo".into();
    cfg.cycler.lease_ms = 300;
    let casd = Running::start(cfg, vec![casd::config::Role::Cycler]).await;
    assert!(cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some());

    let expired = async |c: &mut mysql_async::Conn| -> Option<bool> {
        c.query_first("SELECT expires_at < UTC_TIMESTAMP(6) FROM leases WHERE name = 'cycler:solo'")
            .await
            .unwrap()
    };
    assert_eq!(
        expired(&mut c).await,
        Some(false),
        "held while the database is up"
    );
    proxy.cut();
    // Five lease lengths without the database: still on air throughout.
    let window = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < window {
        assert!(
            cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some(),
            "on air stopped with the database"
        );
    }
    assert_eq!(
        expired(&mut c).await,
        Some(true),
        "the lease ran out meanwhile"
    );
    proxy.restore().await;
    until("the lease renewed", async || {
        (expired(&mut c).await == Some(false)).then_some(())
    })
    .await;
    assert!(cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some());
    assert!(cap.errors.is_empty(), "stream errors: {:?}", cap.errors);
    casd.shutdown().await.unwrap();
}

/// An orderly stop of the one on air releases the lease at once (after
/// its players stopped), so the standby takes over at its next try
/// instead of after the lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orderly_stop_hands_the_lease_over_at_once() {
    use casd::testing::{Capture, Running};

    let (t, mut c, sec_a) = one_live_emm("handed over").await;
    let mut cap = Capture::bind(0x0101).await;
    let mut cfg = casd::testing::config(&t.url, cap.addr());
    cfg.cycler.redundancy_group = "pair".into();
    // Long: a takeover before it runs out can only come from the release
    // (the standby tries every 5 s).
    cfg.cycler.lease_ms = 20_000;
    let first = Running::start(cfg.clone(), vec![casd::config::Role::Cycler]).await;
    assert!(cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some());
    let second = Running::start(cfg, vec![casd::config::Role::Cycler]).await;
    let holder = async |c: &mut mysql_async::Conn| -> (String, u64, bool) {
        c.query_first(
            "SELECT holder, fence, expires_at > UTC_TIMESTAMP(6) FROM leases WHERE name = 'cycler:pair'",
        )
        .await
        .unwrap()
        .unwrap()
    };
    let (held_by, fence, live) = holder(&mut c).await;
    assert_eq!((fence, live), (1, true));

    first.shutdown().await.unwrap();
    let (h, _, live) = holder(&mut c).await;
    assert!(
        !live || h != held_by,
        "the lease was not released by the orderly stop"
    );
    until("the standby holds the lease", async || {
        let (h, f, live) = holder(&mut c).await;
        (h != held_by && f == 2 && live).then_some(())
    })
    .await;
    // From here on only the second one can send.
    cap.errors.clear();
    assert!(cap.until(LIMIT, |s| s == &sec_a[..]).await.is_some());
    second.shutdown().await.unwrap();
}
