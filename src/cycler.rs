//! The Cycler role: the database's live EMMs, played out forever by the
//! `carousel` crate, one player per configured output.
//!
//! - At start the players are spawned first (so the CAT is on air at once),
//!   then every live, unexpired EMM is loaded in id order, in pages.
//! - Then it follows `carousel_events` (written in the same transaction as
//!   every EMM added or withdrawn): woken at once by `Shared::emms_ready`
//!   when the EMMG runs in this process, otherwise every
//!   `cycler.poll_interval_ms`.
//! - Event ids come from AUTO_INCREMENT, which is assigned at insert, not at
//!   commit: a transaction that commits late leaves a *hole* below ids
//!   already seen. Holes are remembered and asked for again on every poll
//!   until they appear or [`HOLE_TIMEOUT`] passes (a rolled-back
//!   transaction leaves a permanent hole).
//! - When the database goes away the players keep playing from memory; the
//!   follower logs the outage once, backs off, and resumes from its
//!   watermark when the database answers again (the pool reconnects).
//! - Every section played is one JSON line in `cycler.log_file`
//!   (emm_id, output, cycle, lane, time), written off the play-out path;
//!   lines that could not be written are counted.
//!
//! Does not know: keys, what is inside an EMM, HTTP.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use carousel::{
    AsyncUdpOutput, CatConfig, Class, Emm, MulticastInterface, MuxConfig, PlayRecord, PlayerConfig,
    PlayerHandle, RtpConfig, ScheduleConfig, UdpConfig, UdpOutput,
};
use mysql_async::prelude::*;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::app::Shared;
use crate::config::{CyclerConfig, OutputConfig, Role};
use crate::jsonlog::JsonLog;

/// How long a hole in the event ids is waited for.
pub const HOLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Rows per page when loading and following.
const PAGE: usize = 2000;
/// Most holes remembered (beyond, the oldest are given up).
const MAX_HOLES: usize = 100_000;

/// Counters of the Cycler (shared with whoever wants to read them).
#[derive(Debug, Default)]
pub struct CyclerStats {
    pub loaded: AtomicU64,
    pub added: AtomicU64,
    pub removed: AtomicU64,
    pub bad_sections: AtomicU64,
    pub db_errors: AtomicU64,
    pub holes_given_up: AtomicU64,
    pub watermark: AtomicU64,
}

/// The carousel's UDP sender for one configured output.
pub fn open_output(o: &OutputConfig) -> anyhow::Result<AsyncUdpOutput> {
    let mut udp = UdpConfig::new(o.destination);
    udp.ttl = Some(o.ttl);
    udp.dscp = (o.dscp != 0).then_some(o.dscp);
    udp.multicast_loop = o.multicast_loop;
    udp.interface = o.interface.clone().map(MulticastInterface::Name);
    let out = UdpOutput::open(&udp)
        .with_context(|| format!("opening output {} to {}", o.name, o.destination))?;
    AsyncUdpOutput::new(out).with_context(|| format!("output {}", o.name))
}

/// The player settings of one output.
pub fn player_config(
    cfg: &CyclerConfig,
    ca_system_id: u16,
    o: &OutputConfig,
) -> anyhow::Result<PlayerConfig> {
    let pid =
        carousel::Pid::new(o.pid).ok_or_else(|| anyhow::anyhow!("output {}: bad PID", o.name))?;
    let mux = MuxConfig {
        emm_pid: pid,
        pack_sections: o.pack_sections,
        packets_per_datagram: usize::from(o.packets_per_datagram),
        bitrate: o.bitrate,
        cbr: o.cbr,
        // A MUX carries its own CAT: a SimulCrypt output sends EMMs only.
        cat: (o.cat && o.simulcrypt.is_none()).then(|| CatConfig {
            ca_system_id,
            ..CatConfig::default()
        }),
        rtp: o.rtp.then(RtpConfig::random),
        ..MuxConfig::default()
    };
    Ok(PlayerConfig {
        name: o.name.clone(),
        mux,
        schedule: ScheduleConfig {
            burst_count: u8::try_from(cfg.burst_count).unwrap_or(u8::MAX),
            burst_interval: cfg.burst_interval_ms,
        },
        clock_anchor_unix_ms: None,
        spin: carousel::DEFAULT_SPIN,
    })
}

#[derive(Serialize)]
struct LogLine<'a> {
    t: String,
    emm_id: u64,
    output: &'a str,
    cycle: u64,
    lane: String,
}

fn rfc3339_ms(unix_ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}

/// The player of one output: UDP, or SimulCrypt with its link and metrics.
fn spawn_output(
    shared: &Shared,
    carousel: &carousel::Carousel,
    o: &OutputConfig,
    records: Option<mpsc::Sender<PlayRecord>>,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<PlayerHandle> {
    let cfg = &shared.cfg.cycler;
    let pc = player_config(cfg, shared.cfg.cas.ca_system_id, o)?;
    let player = match &o.simulcrypt {
        None => carousel.spawn_player(pc, open_output(o)?, records, stop.clone()),
        Some(sc) => {
            let link = crate::simulcrypt::LinkConfig::new(o, sc, shared.cfg.cas.ca_system_id);
            let (out, stats) = crate::simulcrypt::spawn(
                link.clone(),
                pc.mux.emm_pid,
                carousel.on_air_watch(),
                stop.clone(),
            );
            let p = carousel.spawn_player(pc, out, records, stop.clone());
            if let Ok(p) = &p {
                crate::simulcrypt::watch(shared, &link, stats, p.stats_reader());
            }
            p
        }
    };
    player.map_err(|e| anyhow::anyhow!("output {}: {e}", o.name))
}

/// Runs the Cycler until `shared.shutdown`.
pub async fn run(shared: Shared) -> anyhow::Result<()> {
    let cfg = shared.cfg.cycler.clone();
    // A redundant Cycler starts in standby: on air once it holds the lease.
    let carousel = if cfg.redundancy_group.is_empty() {
        carousel::Carousel::new()
    } else {
        carousel::Carousel::standby()
    };
    let mut on_air = crate::onair::OnAir::new(&shared, &carousel);
    let log = JsonLog::with_capacity(&cfg.log_file, cfg.log_rotate_bytes, cfg.log_keep, 65536);
    let (rec_tx, mut rec_rx) = mpsc::channel::<PlayRecord>(65536);
    let players_stop = tokio_util::sync::CancellationToken::new();
    let mut players: Vec<PlayerHandle> = Vec::new();
    for o in &cfg.outputs {
        let records = Some(rec_tx.clone());
        players.push(spawn_output(&shared, &carousel, o, records, &players_stop)?);
    }
    drop(rec_tx);
    log_scheduling();
    watch_outputs(&shared, &players, &log);
    let log_writer = {
        let log = log.clone();
        tokio::spawn(async move {
            while let Some(r) = rec_rx.recv().await {
                let lane = match r.lane {
                    carousel::Lane::Burst { repetition } => format!("burst{repetition}"),
                    carousel::Lane::Cycle => "cycle".into(),
                };
                log.write(&LogLine {
                    t: rfc3339_ms(r.at_unix_ms),
                    emm_id: r.emm_id,
                    output: &r.output,
                    cycle: r.cycle,
                    lane,
                });
            }
        })
    };

    let stats = Arc::new(CyclerStats::default());
    watch_events_behind(&shared, stats.clone());
    let mut follower = Follower::new(shared.clone(), carousel.clone(), stats.clone());
    // Load (retrying while the database is away), then follow.
    tokio::select! {
        _ = shared.shutdown.cancelled() => {}
        _ = async {
            follower.load_all().await;
            shared.readiness.started(Role::Cycler);
            // Hot: loaded and following before it may go on air.
            match on_air.as_mut() {
                Some(duty) => tokio::join!(follower.follow(), duty.run()).0,
                None => follower.follow().await,
            }
        } => {}
    }

    // Orderly stop: players first (they flush nothing: a datagram is sent
    // whole or not at all), then the log.
    players_stop.cancel();
    for p in players {
        let name = p.name().to_owned();
        let s = p.join().await;
        tracing::info!(output = %name, datagrams = s.datagrams, sections = s.sections, records_dropped = s.records_dropped, "output stopped");
    }
    if let Some(duty) = &on_air {
        duty.release().await;
    }
    let _ = log_writer.await;
    log.flush().await;
    if log.dropped() > 0 {
        tracing::warn!(dropped = log.dropped(), "carousel log lines not written");
    }
    Ok(())
}

/// Says whether the play-out threads (which inherit this thread's policy)
/// run with real-time priority, as the systemd unit grants by default.
fn log_scheduling() {
    let s = carousel::thread_scheduling();
    if s.is_real_time() {
        tracing::info!(scheduling = %s, "cycler: play-out threads have real-time priority");
    } else {
        tracing::warn!(scheduling = %s, "cycler: play-out threads without real-time priority (CPUSchedulingPolicy=fifo in the systemd unit grants it); under CPU load their timing follows the load");
    }
}

/// The per-output `casd_cycler_*` metrics, read from the players'
/// counters at scrape time (nothing added to the play-out loop), and the
/// play-out log lines dropped. Public for the metrics bench
/// (tests/it/metrics_bench.rs), which measures it on a player.
pub fn watch_outputs(shared: &Shared, players: &[PlayerHandle], log: &JsonLog) {
    let m = &shared.metrics;
    let targets = shared.cfg.cycler.cycle_targets_s();
    let mut readers = Vec::new();
    for p in players {
        let o = |extra: Option<&'static str>| -> Vec<(&'static str, String)> {
            let mut l = vec![("output", p.name().to_string())];
            l.extend(extra.map(|c| ("class", c.to_string())));
            l
        };
        let c = |name, help| m.counter(name, help, &o(None));
        let g = |name, help| m.gauge(name, help, &o(None));
        let per_class = |name, help| CLASSES.map(|class| m.gauge(name, help, &o(Some(class))));
        let out = OutputMetrics {
            bytes: c(
                "casd_cycler_bytes_sent_total",
                "TS bytes sent by the output.",
            ),
            packets: c(
                "casd_cycler_packets_sent_total",
                "TS packets sent by the output.",
            ),
            datagrams: c(
                "casd_cycler_datagrams_sent_total",
                "UDP datagrams sent by the output.",
            ),
            send_errors: c(
                "casd_cycler_send_errors_total",
                "Datagrams the output failed to send.",
            ),
            fast_lane: g(
                "casd_cycler_fast_lane_depth",
                "EMMs in the output's fast lane.",
            ),
            last_age: g(
                "casd_cycler_last_datagram_age_seconds",
                "Seconds since the output's last datagram (at scrape time).",
            ),
            live: per_class(
                "casd_cycler_live_emms",
                "Live EMMs in the output's carousel, by class.",
            ),
            cycle: per_class(
                "casd_cycler_cycle_seconds",
                "Duration of the last full pass of the cycle (every class plays once per pass).",
            ),
            started_ms: unix_ms(),
        };
        let target = per_class(
            "casd_cycler_cycle_target_seconds",
            "Configured longest acceptable pass (cycler.cycle_target_<class>_s).",
        );
        for (g, t) in target.iter().zip(targets) {
            g.set(t);
        }
        readers.push((p.stats_reader(), out));
    }
    let log_dropped = m.counter(
        "casd_cycler_playout_log_dropped_total",
        "Play-out log lines not written (queue full or write error).",
        &[],
    );
    let log = log.clone();
    m.on_scrape(move || {
        let mut dropped = log.dropped();
        for (r, out) in &readers {
            let s = r.stats();
            out.set(&s);
            dropped += s.records_dropped;
        }
        log_dropped.absolute(dropped);
    });
}

const CLASSES: [&str; 3] = ["urgent", "change", "background"];

struct OutputMetrics {
    bytes: metrics::Counter,
    packets: metrics::Counter,
    datagrams: metrics::Counter,
    send_errors: metrics::Counter,
    fast_lane: metrics::Gauge,
    last_age: metrics::Gauge,
    live: [metrics::Gauge; 3],
    cycle: [metrics::Gauge; 3],
    /// When the output started (Unix ms): an output that never sent is
    /// as old as the output.
    started_ms: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl OutputMetrics {
    fn set(&self, s: &carousel::PlayerStats) {
        self.bytes.absolute(s.ts_bytes);
        self.packets
            .absolute(s.ts_bytes / carousel::ts::PACKET_LEN as u64);
        self.datagrams.absolute(s.datagrams);
        self.send_errors.absolute(s.send_errors);
        self.fast_lane.set(s.fast_lane as f64);
        for (g, v) in self.live.iter().zip(s.live_by_class) {
            g.set(v as f64);
        }
        // Every class is played once per pass: its cycle is the pass.
        for g in &self.cycle {
            g.set(s.last_cycle_ms as f64 / 1000.0);
        }
        let last = match s.last_datagram_unix_ms {
            0 => self.started_ms,
            at => at,
        };
        self.last_age
            .set(unix_ms().saturating_sub(last) as f64 / 1000.0);
    }
}

/// `casd_cycler_events_behind`: `carousel_events` rows past the follower's
/// watermark, from one cheap query (the primary key's maximum) per second.
fn watch_events_behind(shared: &Shared, stats: Arc<CyclerStats>) {
    if !shared.metrics.is_on() {
        return;
    }
    let behind = shared.metrics.gauge(
        "casd_cycler_events_behind",
        "carousel_events rows written but not yet applied by this Cycler.",
        &[],
    );
    let db = shared.db.clone();
    crate::metrics::every(PROBE_EVERY, shared.shutdown.clone(), move || {
        let (db, stats, behind) = (db.clone(), stats.clone(), behind.clone());
        async move {
            let max: anyhow::Result<Option<u64>> = async {
                let mut c = db.conn().await?;
                Ok(
                    c.query_first("SELECT COALESCE(MAX(id), 0) FROM carousel_events")
                        .await?,
                )
            }
            .await;
            // Unknown while the database is away: keep the last value.
            if let Ok(Some(max)) = max {
                let seen = stats.watermark.load(Ordering::Relaxed);
                behind.set(max.saturating_sub(seen) as f64);
            }
        }
    });
}

const PROBE_EVERY: Duration = Duration::from_secs(1);

struct Follower {
    shared: Shared,
    carousel: carousel::Carousel,
    stats: Arc<CyclerStats>,
    watermark: u64,
    holes: BTreeMap<u64, Instant>,
    db_down_since: Option<Instant>,
}

type EventRow = (
    u64,
    u64,
    String,
    Option<u8>,
    Option<u64>,
    Option<Vec<u8>>,
    Option<String>,
);

impl Follower {
    fn new(shared: Shared, carousel: carousel::Carousel, stats: Arc<CyclerStats>) -> Self {
        Follower {
            shared,
            carousel,
            stats,
            watermark: 0,
            holes: BTreeMap::new(),
            db_down_since: None,
        }
    }

    fn db_failed(&mut self, e: &dyn std::fmt::Display) {
        self.stats.db_errors.fetch_add(1, Ordering::Relaxed);
        if self.db_down_since.is_none() {
            tracing::warn!("cycler: database unreachable ({e}); playing from memory, retrying");
            self.db_down_since = Some(Instant::now());
        }
    }

    fn db_ok(&mut self) {
        if let Some(since) = self.db_down_since.take() {
            tracing::info!(down_for = ?since.elapsed(), "cycler: database back");
        }
    }

    /// Backoff while the database is away: 50 ms doubling to 2 s.
    async fn backoff(&self, attempt: u32) {
        let ms = (50u64 << attempt.min(6)).min(2000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn add(&self, id: u64, class: u8, not_after_s: u64, section: Vec<u8>) {
        let emm = Emm {
            id,
            class: Class::from_u8(class).unwrap_or(Class::Background),
            not_after: not_after_s.saturating_mul(1000),
            section: Bytes::from(section),
        };
        match self.carousel.add(emm).await {
            Ok(()) => {
                self.stats.added.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.bad_sections.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    emm_id = id,
                    "cycler: stored section is invalid, not played: {e}"
                );
            }
        }
    }

    /// Every live EMM, in pages; retried until it succeeds.
    async fn load_all(&mut self) {
        let mut attempt = 0;
        loop {
            match self.try_load_all().await {
                Ok(n) => {
                    self.db_ok();
                    tracing::info!(
                        emms = n,
                        watermark = self.watermark,
                        "cycler: carousel loaded"
                    );
                    return;
                }
                Err(e) => {
                    self.db_failed(&e);
                    self.backoff(attempt).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn try_load_all(&mut self) -> anyhow::Result<u64> {
        let mut c = self.shared.db.conn().await?;
        // The watermark is read before the load: events after it are
        // replayed by `follow`, and replaying an add or remove is harmless.
        let wm: Option<u64> = c
            .query_first("SELECT COALESCE(MAX(id), 0) FROM carousel_events")
            .await?;
        self.watermark = wm.unwrap_or(0);
        // A transaction still open now may hold an id below the watermark:
        // every id missing among the events of the last HOLE_TIMEOUT is a
        // hole to watch (ids older than that window are settled).
        let settled: Option<u64> = c
            .exec_first(
                "SELECT COALESCE(MAX(id), 0) FROM carousel_events WHERE created_at <= UTC_TIMESTAMP(6) - INTERVAL ? SECOND",
                (HOLE_TIMEOUT.as_secs(),),
            )
            .await?;
        let from = settled.unwrap_or(0) + 1;
        if from <= self.watermark {
            let present: Vec<u64> = c
                .exec(
                    "SELECT id FROM carousel_events WHERE id >= ? AND id <= ?",
                    (from, self.watermark),
                )
                .await?;
            let present: std::collections::HashSet<u64> = present.into_iter().collect();
            let now = Instant::now();
            for id in from..=self.watermark {
                if !present.contains(&id) && self.holes.len() < MAX_HOLES {
                    self.holes.insert(id, now);
                }
            }
        }
        let mut after = 0u64;
        let mut n = 0u64;
        loop {
            let rows: Vec<(u64, u8, u64, Vec<u8>)> = c
                .exec(
                    "SELECT id, class, FLOOR(UNIX_TIMESTAMP(not_after)), encrypted_emm FROM emms \
                     WHERE state = 'live' AND id > ? AND not_after > UTC_TIMESTAMP(6) ORDER BY id LIMIT ?",
                    (after, PAGE as u64),
                )
                .await?;
            let done = rows.len() < PAGE;
            for (id, class, not_after, section) in rows {
                after = id;
                self.add(id, class, not_after, section).await;
                n += 1;
            }
            if done {
                break;
            }
        }
        self.stats.loaded.store(n, Ordering::Relaxed);
        self.stats
            .watermark
            .store(self.watermark, Ordering::Relaxed);
        Ok(n)
    }

    /// Follows carousel_events until shutdown.
    async fn follow(&mut self) {
        let poll = Duration::from_millis(self.shared.cfg.cycler.poll_interval_ms.max(1));
        let notify = self.shared.emms_ready.clone();
        let mut attempt = 0u32;
        loop {
            match self.poll_once().await {
                Ok(more) => {
                    self.db_ok();
                    attempt = 0;
                    if more {
                        continue;
                    }
                }
                Err(e) => {
                    self.db_failed(&e);
                    self.backoff(attempt).await;
                    attempt += 1;
                    continue;
                }
            }
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// One poll; `Ok(true)` when a full page came back (more may wait).
    pub async fn poll_once(&mut self) -> anyhow::Result<bool> {
        self.expire_holes();
        let mut c = self.shared.db.conn().await?;
        let hole_list: Vec<String> = self
            .holes
            .keys()
            .take(1000)
            .map(|h| h.to_string())
            .collect();
        let holes_sql = if hole_list.is_empty() {
            String::new()
        } else {
            format!(" OR e.id IN ({})", hole_list.join(","))
        };
        // Text, not a prepared statement: the hole list changes the
        // statement at almost every poll (a PREPARE round trip each time);
        // every value in it is an integer we hold.
        let rows: Vec<EventRow> = c
            .query(format!(
                "SELECT e.id, e.emm_id, e.op, m.class, FLOOR(UNIX_TIMESTAMP(m.not_after)), m.encrypted_emm, m.state \
                 FROM carousel_events e LEFT JOIN emms m ON m.id = e.emm_id \
                 WHERE e.id > {}{holes_sql} ORDER BY e.id LIMIT {PAGE}",
                self.watermark
            ))
            .await?;
        drop(c);
        let full = rows.len() >= PAGE;
        for (id, emm_id, op, class, not_after, section, state) in rows {
            if self.holes.remove(&id).is_none() {
                if id <= self.watermark {
                    continue;
                }
                let now = Instant::now();
                for missing in (self.watermark + 1)..id {
                    if self.holes.len() >= MAX_HOLES {
                        break;
                    }
                    self.holes.insert(missing, now);
                }
                self.watermark = id;
            }
            match (op.as_str(), class, not_after, section, state.as_deref()) {
                ("add", Some(class), Some(na), Some(section), Some("live")) => {
                    self.add(emm_id, class, na, section).await;
                }
                ("add", ..) => {} // withdrawn or purged since: its remove follows or came already
                _ => {
                    self.carousel.remove(emm_id).await;
                    self.stats.removed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.stats
            .watermark
            .store(self.watermark, Ordering::Relaxed);
        Ok(full)
    }

    fn expire_holes(&mut self) {
        let now = Instant::now();
        let before = self.holes.len();
        self.holes
            .retain(|_, seen| now.duration_since(*seen) < HOLE_TIMEOUT);
        let given_up = before - self.holes.len();
        if given_up > 0 {
            self.stats
                .holes_given_up
                .fetch_add(given_up as u64, Ordering::Relaxed);
        }
    }
}
