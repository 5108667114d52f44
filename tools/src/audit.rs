//! `casd-probe audit`: what is on air against what the `emms` table says
//! should be. See docs/tools.md for the rules.

use std::collections::HashMap;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use mysql_async::prelude::*;
use serde_json::{json, Value};

use crate::capture::{capture, unix_now, Recorders};
use crate::cli::{DecodeArgs, InputArgs};
use crate::decode::{Kind, Seen};
use crate::report::{address_str, Printer};

#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// mysql://user:password@host:port/database of the headend.
    #[arg(
        long,
        env = "CASD_PROBE_DB_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub db_url: String,
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// Every live EMM must be seen at least once in any window of this many
    /// seconds (default: the capture's duration, i.e. "seen at all").
    #[arg(long, value_name = "S")]
    pub max_period: Option<f64>,
    /// Seconds an EMM may still be seen after it was withdrawn or expired.
    #[arg(long, value_name = "S", default_value_t = 2.0)]
    pub grace: f64,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also print the decoded records while capturing.
    #[arg(long, short)]
    pub verbose: bool,
}

/// One `emms` row as the audit needs it.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: u64,
    pub addressing: String,
    pub address: u64,
    pub state: String,
    pub created: f64,
    pub not_after: f64,
}

impl Row {
    /// A row as read: the times in microseconds since the epoch.
    fn from_db(
        id: u64,
        addressing: String,
        address: u64,
        state: String,
        created_us: i64,
        not_after_us: i64,
    ) -> Row {
        Row {
            id,
            addressing,
            address,
            state,
            created: seconds(created_us),
            not_after: seconds(not_after_us),
        }
    }
}

fn seconds(us: i64) -> f64 {
    us as f64 / 1e6
}

const PAGE: usize = 2000;
/// id, addressing, address, state, created_at µs, not_after µs, section.
type RowTuple = (u64, String, u64, String, i64, i64, Vec<u8>);
/// The same plus the time of the last 'remove' event (µs).
type RowTupleRemoved = (u64, String, u64, String, i64, i64, Vec<u8>, Option<i64>);
const US: &str = "'1970-01-01 00:00:00'";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The headend's database, read only. A pool of its own rather than casd's
/// `db::Db`, so that the probe does not link the daemon: the session runs in
/// UTC as the headend's do (the times below are read as UTC), and errors
/// name the database without its password.
struct Db {
    pool: mysql_async::Pool,
    display: String,
}

impl Db {
    fn new(url: &str) -> anyhow::Result<Db> {
        let opts = mysql_async::Opts::from_url(url)
            .map_err(|_| anyhow!("the database URL is not a valid mysql:// URL"))?;
        let display = format!(
            "mysql://{}@{}:{}/{}",
            opts.user().unwrap_or(""),
            opts.ip_or_hostname(),
            opts.tcp_port(),
            opts.db_name().unwrap_or("")
        );
        let pool_size = mysql_async::PoolConstraints::new(0, 2);
        let opts = mysql_async::OptsBuilder::from_opts(opts)
            .pool_opts(
                mysql_async::PoolOpts::default()
                    .with_constraints(pool_size.ok_or_else(|| anyhow!("pool size"))?),
            )
            .init(vec!["SET time_zone = '+00:00'"]);
        Ok(Db {
            pool: mysql_async::Pool::new(opts),
            display,
        })
    }

    /// A pooled connection, or an error naming the database after the
    /// connect timeout.
    async fn conn(&self) -> anyhow::Result<mysql_async::Conn> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.pool.get_conn()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(anyhow!("{}: {e}", self.display)),
            Err(_) => Err(anyhow!(
                "{}: no connection within {} s",
                self.display,
                CONNECT_TIMEOUT.as_secs()
            )),
        }
    }

    /// `SELECT 1` round trip.
    async fn ping(&self) -> anyhow::Result<()> {
        let mut c = self.conn().await?;
        let _: Option<u8> = c
            .query_first("SELECT 1")
            .await
            .map_err(|e| anyhow!("{}: {e}", self.display))?;
        Ok(())
    }
}

async fn load(db: &Db) -> anyhow::Result<HashMap<Vec<u8>, Row>> {
    let mut c = db.conn().await?;
    let mut out = HashMap::new();
    let mut after = 0u64;
    loop {
        let rows: Vec<RowTuple> = c
            .exec(
                format!(
                    "SELECT id, addressing, address, state, TIMESTAMPDIFF(MICROSECOND, {US}, created_at), \
                     TIMESTAMPDIFF(MICROSECOND, {US}, not_after), encrypted_emm FROM emms \
                     WHERE state = 'live' AND id > ? ORDER BY id LIMIT {PAGE}"
                ),
                (after,),
            )
            .await
            .context("reading emms")?;
        let n = rows.len();
        for (id, addressing, address, state, created, not_after, bytes) in rows {
            after = id;
            let row = Row::from_db(id, addressing, address, state, created, not_after);
            out.insert(bytes, row);
        }
        if n < PAGE {
            return Ok(out);
        }
    }
}

/// Rows (any state) whose section bytes are among `sections`, with the time
/// of their last 'remove' carousel event.
async fn lookup(
    db: &Db,
    sections: &[&[u8]],
) -> anyhow::Result<HashMap<Vec<u8>, (Row, Option<f64>)>> {
    let mut c = db.conn().await?;
    let mut out = HashMap::new();
    for batch in sections.chunks(200) {
        let marks = vec!["?"; batch.len()].join(",");
        let params: Vec<mysql_async::Value> = batch
            .iter()
            .map(|b| mysql_async::Value::from(b.to_vec()))
            .collect();
        let rows: Vec<RowTupleRemoved> = c
            .exec(
                format!(
                    "SELECT e.id, e.addressing, e.address, e.state, TIMESTAMPDIFF(MICROSECOND, {US}, e.created_at), \
                     TIMESTAMPDIFF(MICROSECOND, {US}, e.not_after), e.encrypted_emm, \
                     (SELECT TIMESTAMPDIFF(MICROSECOND, {US}, MAX(ce.created_at)) FROM carousel_events ce \
                      WHERE ce.emm_id = e.id AND ce.op = 'remove') \
                     FROM emms e WHERE e.encrypted_emm IN ({marks})"
                ),
                params,
            )
            .await
            .context("looking up sections in emms")?;
        for (id, addressing, address, state, created, not_after, bytes, removed) in rows {
            let row = Row::from_db(id, addressing, address, state, created, not_after);
            out.insert(bytes, (row, removed.map(seconds)));
        }
    }
    Ok(out)
}

fn row_json(r: &Row) -> Value {
    json!({"emm_id": r.id, "addressing": r.addressing, "address": r.address})
}

fn row_str(r: &Row) -> String {
    match r.addressing.as_str() {
        "global" => format!("emm {} (global)", r.id),
        a => format!("emm {} ({a} {})", r.id, r.address),
    }
}

/// The comparison itself, pure: `live` rows, the `known` rows of sections
/// not among them, what was seen, the capture window (None: no timing).
pub fn compare(
    live: &HashMap<Vec<u8>, Row>,
    known: &HashMap<Vec<u8>, (Row, Option<f64>)>,
    seen: &HashMap<bytes::Bytes, Seen>,
    window: Option<(f64, f64)>,
    max_period: Option<f64>,
    grace: f64,
    now: f64,
) -> Value {
    let rules = Rules {
        window,
        period: max_period.or(window.map(|(a, b)| b - a)),
        grace,
        now,
    };
    let mut tally = Tally::default();
    let mut ids: Vec<(&Vec<u8>, &Row)> = live.iter().collect();
    ids.sort_by_key(|(_, r)| r.id);
    for (bytes, r) in ids {
        rules.check_live(r, seen.get(bytes.as_slice()), &mut tally);
    }
    let mut on_air: Vec<(&bytes::Bytes, &Seen)> = seen
        .iter()
        .filter(|(_, s)| matches!(s.kind, Kind::Emm { .. }))
        .collect();
    on_air.sort_by(|(a, x), (b, y)| (x.first_packet, a).cmp(&(y.first_packet, b)));
    let distinct = on_air.len();
    for (bytes, s) in on_air {
        if !live.contains_key(bytes.as_ref()) {
            let problem = rules.check_not_live(bytes, s, known.get(bytes.as_ref()));
            tally.problems.extend(problem);
        }
    }
    json!({
        "type": "audit",
        "ok": tally.problems.is_empty(),
        "window": window.map(|(a, b)| json!({"start": a, "end": b, "duration_s": b - a})),
        "max_period_s": rules.period,
        "grace_s": grace,
        "live_rows": live.len(),
        "expected": tally.expected,
        "in_period": tally.in_period,
        "on_air_distinct": distinct,
        "problems": tally.problems,
    })
}

/// What [`compare`] holds every row and section against.
struct Rules {
    window: Option<(f64, f64)>,
    /// --max-period, else the capture's duration ("seen at all").
    period: Option<f64>,
    grace: f64,
    now: f64,
}

/// What [`compare`] has found so far.
#[derive(Default)]
struct Tally {
    problems: Vec<Value>,
    /// Live rows that had to be on air during the capture.
    expected: u64,
    /// Those of them seen often enough.
    in_period: u64,
}

fn problem(kind: &str, r: &Row, detail: String) -> Value {
    json!({"kind": kind, "row": row_json(r), "detail": detail})
}

impl Rules {
    /// A live row: on air when due, often enough, and not past its expiry.
    fn check_live(&self, r: &Row, s: Option<&Seen>, t: &mut Tally) {
        if let Some(s) = s {
            t.problems.extend(self.expired_on_air(r, s));
        }
        match (self.window, self.period) {
            (Some(window), Some(period)) => self.check_timed(r, s, window, period, t),
            _ => {
                if r.not_after < self.now {
                    return;
                }
                t.expected += 1;
                if s.is_some() {
                    t.in_period += 1;
                } else {
                    let detail = format!("{} is live but not in the capture", row_str(r));
                    t.problems.push(problem("missing", r, detail));
                }
            }
        }
    }

    fn expired_on_air(&self, r: &Row, s: &Seen) -> Option<Value> {
        let last = s.last_time.unwrap_or(f64::NEG_INFINITY);
        let late = match self.window {
            Some(_) => last > r.not_after + self.grace,
            None => r.not_after < self.now,
        };
        late.then(|| {
            let detail = format!(
                "{} expired at {:.3} but was on air until {:.3}",
                row_str(r),
                r.not_after,
                last
            );
            problem("expired_on_air", r, detail)
        })
    }

    /// With timing: the row's sightings while it was due, and the longest
    /// time it was off air.
    fn check_timed(
        &self,
        r: &Row,
        s: Option<&Seen>,
        (t0, t1): (f64, f64),
        period: f64,
        t: &mut Tally,
    ) {
        let (ws, we) = (t0.max(r.created), t1.min(r.not_after));
        if we <= ws {
            return; // not due on air during the capture
        }
        let times: Vec<f64> = s
            .map(|s| {
                s.times
                    .iter()
                    .copied()
                    .filter(|t| *t >= ws && *t <= we + self.grace)
                    .collect()
            })
            .unwrap_or_default();
        if times.is_empty() {
            if we - ws >= period.min(t1 - t0) - 1e-9 {
                t.expected += 1;
                let detail = format!(
                    "{} is live but was not on air during {:.3} s of capture",
                    row_str(r),
                    we - ws
                );
                t.problems.push(problem("missing", r, detail));
            }
            return;
        }
        t.expected += 1;
        let (gap, at) = longest_gap(&times, ws, we);
        if gap > period {
            let detail = format!(
                "{} was off air for {gap:.3} s from {:.3} s into the capture (max period {period:.3} s)",
                row_str(r),
                at - t0
            );
            let mut p = problem("late", r, detail);
            p["gap_s"] = json!(gap);
            t.problems.push(p);
        } else {
            t.in_period += 1;
        }
    }

    /// An EMM section on air that is not a live row.
    fn check_not_live(
        &self,
        bytes: &[u8],
        s: &Seen,
        known: Option<&(Row, Option<f64>)>,
    ) -> Option<Value> {
        match known {
            Some((r, removed)) if r.state == "withdrawn" => {
                let last = s.last_time.unwrap_or(f64::INFINITY);
                let w = removed.unwrap_or(f64::NEG_INFINITY);
                // Without timing any sighting counts; with it, only those
                // after the grace that follows the removal.
                if !(self.window.is_none() || last > w + self.grace) {
                    return None;
                }
                let when = removed
                    .map(|w| format!("withdrawn at {w:.3}"))
                    .unwrap_or_else(|| "withdrawn (no remove event)".into());
                let at = s
                    .last_time
                    .map(|l| format!(" at {l:.3}"))
                    .unwrap_or_default();
                let detail = format!("{} is {when} but was on air{at}", row_str(r));
                Some(problem("withdrawn_on_air", r, detail))
            }
            Some((r, _)) => {
                let detail = format!("{} is on air in state {}", row_str(r), r.state);
                Some(problem("unexpected", r, detail))
            }
            None => Some(unknown_on_air(bytes, s)),
        }
    }
}

/// The longest time off air within `[start, end]` given the sighting
/// `times` (sorted, not empty), and when it began.
fn longest_gap(times: &[f64], start: f64, end: f64) -> (f64, f64) {
    let mut gap: f64 = times[0] - start;
    let mut at = start;
    for w in times.windows(2) {
        if w[1] - w[0] > gap {
            gap = w[1] - w[0];
            at = w[0];
        }
    }
    let last = times[times.len() - 1];
    if end - last > gap {
        gap = end - last;
        at = last;
    }
    (gap, at)
}

fn unknown_on_air(bytes: &[u8], s: &Seen) -> Value {
    let (mode, ext, address) = match &s.kind {
        Kind::Emm {
            mode,
            table_id_extension,
            address,
            ..
        } => (*mode, *table_id_extension, address.clone()),
        _ => ("?", 0, Value::Null),
    };
    json!({"kind": "unknown_on_air", "table_id_extension": ext, "mode": mode, "address": address,
        "emm_id": s.emm_id(), "len": bytes.len(), "pid": s.pid, "count": s.count,
        "detail": format!("an EMM section on air matches no row of emms: {} ext {ext:#06x}, {} bytes, PID {:#06x}, seen {}x",
            address_str(&address), bytes.len(), s.pid, s.count)})
}

pub fn print_human(o: &mut dyn Write, v: &Value) -> io::Result<()> {
    let problems = v["problems"].as_array().cloned().unwrap_or_default();
    writeln!(
        o,
        "audit: {} — {} live rows, {} expected on air, {} seen within the period, {} distinct EMM sections on air{}",
        if problems.is_empty() { "OK" } else { "DIFFERENCES" },
        v["live_rows"],
        v["expected"],
        v["in_period"],
        v["on_air_distinct"],
        v["max_period_s"].as_f64().map(|p| format!(", max period {p:.3} s")).unwrap_or_else(|| ", no timing (file input)".into())
    )?;
    for p in problems {
        writeln!(
            o,
            "  {}: {}",
            p["kind"].as_str().unwrap_or("?"),
            p["detail"].as_str().unwrap_or("")
        )?;
    }
    Ok(())
}

pub fn run(a: AuditArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let db = Db::new(&a.db_url)?;
    rt.block_on(db.ping())?;
    let mut cfg = a.decode.probe_config(&a.input)?;
    cfg.keep_times = true;
    let stdout = io::stdout();
    let mut printer = Printer::new(io::BufWriter::new(stdout.lock()), a.json);
    let verbose = a.verbose;
    let mut emit = |v: &Value| -> io::Result<()> {
        if verbose && v["type"] != "summary" {
            printer.emit(v)?;
        }
        Ok(())
    };
    let cap = capture(&a.input, cfg, &mut Recorders::default(), None, 0, &mut emit)?;
    let live = rt.block_on(load(&db))?;
    let unmatched: Vec<&[u8]> = cap
        .probe
        .sections()
        .iter()
        .filter(|(b, s)| matches!(s.kind, Kind::Emm { .. }) && !live.contains_key(b.as_ref()))
        .map(|(b, _)| b.as_ref())
        .collect();
    let known = rt.block_on(lookup(&db, &unmatched))?;
    let now = unix_now();
    let mut report = compare(
        &live,
        &known,
        cap.probe.sections(),
        cap.window,
        a.max_period,
        a.grace,
        now,
    );
    report["input"] = json!(cap.input);
    report["stream"] = cap.probe.summary(true, 0)["errors"].clone();
    printer.emit(&report)?;
    printer.flush()?;
    Ok(if report["ok"] == Value::Bool(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_includes_both_ends() {
        // Start to first sighting.
        assert_eq!(longest_gap(&[5.0, 6.0], 0.0, 7.0), (5.0, 0.0));
        // Between sightings.
        assert_eq!(longest_gap(&[1.0, 2.0, 6.0], 0.0, 7.0), (4.0, 2.0));
        // Last sighting to the end.
        assert_eq!(longest_gap(&[1.0, 2.0], 0.0, 9.0), (7.0, 2.0));
        // Ties keep the earliest.
        assert_eq!(longest_gap(&[2.0, 4.0], 0.0, 6.0), (2.0, 0.0));
    }

    #[test]
    fn row_times_from_microseconds() {
        let r = Row::from_db(7, "unique".into(), 9, "live".into(), 1_500_000, 2_000_001);
        assert_eq!((r.created, r.not_after), (1.5, 2.000001));
        assert_eq!(row_str(&r), "emm 7 (unique 9)");
    }
}
