//! `casd devices import FILE`: loads a subscriber base (device ids, with
//! optional entitlements) through the SMS round, so that one place decides
//! every state change (`sms::store::accept_batch_on`: slots, refusals,
//! requests, work items), in batches of hundreds of commands per
//! transaction.
//!
//! - **Formats.** Decided by the first line that is not blank or a `#`
//!   comment: `{` → JSON lines (`{"device_id": 7, "entitlements":
//!   [{"product_id": 3, "start": …, "end": …}]}`), else CSV (`device_id`
//!   then any number of `product_id,start,end` triples; a first row
//!   starting with `device_id` is a header). Times as the SMS API takes
//!   them: unix seconds or RFC 3339.
//! - **Idempotent and resumable.** Every command is stored as an SMS
//!   request of the sender [`SENDER`] with a transaction_id made of its
//!   content (`import:add:<device>`, `import:ent:<device>:<product>:<start>:<end>`):
//!   a rerun (after a crash, or of the same file) replays what is stored
//!   and stores only the rest, never twice. A device that exists already
//!   (added by the SMS) counts as present, and its entitlements are added.
//! - **Bad lines** are reported with their line number and skipped; the
//!   rest is imported. A batch-wide failure (the database went away) stops
//!   the import with nothing of that batch half-written: rerun it.
//! - **Air.** The commands are bulk ([`crate::queue::BulkPace`]): their
//!   work items are spaced to `emmg.bulk_bandwidth_share` of the slowest
//!   output and their EMMs go in the background class.

use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use crate::db::Db;
use crate::queue::BulkPace;
use crate::sms::store::{self, Accepted, SlotHint, Submission};
use crate::sms::types::{parse_command, CommandKind, CommandRequest, SmsCommand, TransactionId};
use crate::sms::SmsError;

/// `sms_requests.sender` of imported commands (not a valid OAuth client
/// id: no SMS client can collide with it).
pub const SENDER: &str = "casd:import";

/// Bad lines kept in the summary (every one is reported as it is met).
const BAD_KEPT: usize = 1000;

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Device lines read (bad ones included).
    pub lines: u64,
    pub devices_added: u64,
    /// Devices that were there already (the SMS's, or a previous run's).
    pub devices_present: u64,
    pub entitlements_added: u64,
    /// Commands a previous run had stored (replayed, nothing written).
    pub replayed: u64,
    /// Number of bad lines, and the first [`BAD_KEPT`] of them.
    pub bad_lines: u64,
    pub bad: Vec<(u64, String)>,
}

/// One line of the file: its number and its commands, or why it is bad.
type ParsedLine = (u64, Result<Vec<CommandRequest>, String>);

/// Imports `path`, `batch` lines per call of the SMS round; `progress` is
/// told the bytes read so far, `bad` each bad line as it is met.
pub async fn import_file(
    db: &Db,
    path: &Path,
    batch: usize,
    max_section_bytes: usize,
    pace: BulkPace,
    progress: &mut dyn FnMut(u64),
    bad: &mut dyn FnMut(u64, &str),
) -> anyhow::Result<Summary> {
    let mut reader = Reader::open(path, max_section_bytes)?;
    let mut conn = db.conn().await?;
    let after = crate::queue::bulk_horizon(&mut conn).await?;
    let pace = Arc::new(pace.after(after));
    let hint = SlotHint::default();
    let mut sum = Summary::default();
    loop {
        let lines = reader.next_batch(batch.max(1))?;
        if lines.is_empty() {
            break;
        }
        sum.lines += lines.len() as u64;
        let (subs, owner) = submissions(&lines, &pace, &mut |n, why| report(&mut sum, bad, n, why));
        let results = store::accept_batch_on(&mut conn, &subs, &hint).await;
        let mut failed_line = None;
        for ((sub, line), r) in subs.iter().zip(owner).zip(results) {
            match outcome(&mut sum, &sub.req.command, r)? {
                Some(why) if failed_line != Some(line) => {
                    failed_line = Some(line);
                    report(&mut sum, bad, line, &why);
                }
                _ => {}
            }
        }
        progress(reader.position());
    }
    tracing::info!(
        lines = sum.lines,
        devices_added = sum.devices_added,
        devices_present = sum.devices_present,
        entitlements_added = sum.entitlements_added,
        replayed = sum.replayed,
        bad_lines = sum.bad_lines,
        "device import done"
    );
    Ok(sum)
}

fn report(sum: &mut Summary, bad: &mut dyn FnMut(u64, &str), line: u64, why: &str) {
    sum.bad_lines += 1;
    if sum.bad.len() < BAD_KEPT {
        sum.bad.push((line, why.to_owned()));
    }
    bad(line, why);
}

/// The batch's submissions and, for each, its line number.
fn submissions(
    lines: &[ParsedLine],
    pace: &Arc<BulkPace>,
    bad: &mut dyn FnMut(u64, &str),
) -> (Vec<Submission>, Vec<u64>) {
    let now = OffsetDateTime::now_utc();
    let mut subs = Vec::with_capacity(lines.len() * 2);
    let mut owner = Vec::with_capacity(lines.len() * 2);
    for (n, parsed) in lines {
        match parsed {
            Err(why) => bad(*n, why),
            Ok(reqs) => {
                for req in reqs {
                    subs.push(Submission {
                        sender: SENDER.to_owned(),
                        path: req.command.kind().path(),
                        message: serde_json::to_string(&req.command).unwrap_or_default(),
                        received_at: now,
                        req: req.clone(),
                        bulk: Some(pace.clone()),
                    });
                    owner.push(*n);
                }
            }
        }
    }
    (subs, owner)
}

/// Counts one command's outcome; `Some(reason)` when its line is bad,
/// `Err` when the whole batch failed (nothing of it was stored).
fn outcome(
    sum: &mut Summary,
    cmd: &SmsCommand,
    r: Result<Accepted, SmsError>,
) -> anyhow::Result<Option<String>> {
    let add = matches!(cmd, SmsCommand::AddDevice { .. });
    match r {
        Ok(Accepted::New { .. }) if add => sum.devices_added += 1,
        Ok(Accepted::New { .. }) => sum.entitlements_added += 1,
        Ok(Accepted::Replay { .. }) => sum.replayed += 1,
        Err(SmsError::DeviceExists(_)) if add => sum.devices_present += 1,
        Err(e @ (SmsError::Db(_) | SmsError::Internal(_))) => {
            anyhow::bail!("the import stopped (rerun it to continue): {e}")
        }
        Err(e) => return Ok(Some(e.to_string())),
    }
    Ok(None)
}

/// The file, line by line, in the format its first line says.
struct Reader {
    lines: std::io::Lines<std::io::BufReader<CountingFile>>,
    read: Arc<std::sync::atomic::AtomicU64>,
    csv: Option<bool>,
    number: u64,
    max_section_bytes: usize,
}

/// A file that counts the bytes read from it (for the progress bar).
struct CountingFile {
    file: std::fs::File,
    read: Arc<std::sync::atomic::AtomicU64>,
}

impl std::io::Read for CountingFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

impl Reader {
    fn open(path: &Path, max_section_bytes: usize) -> anyhow::Result<Reader> {
        let file =
            std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counting = CountingFile {
            file,
            read: read.clone(),
        };
        Ok(Reader {
            lines: std::io::BufReader::with_capacity(1 << 16, counting).lines(),
            read,
            csv: None,
            number: 0,
            max_section_bytes,
        })
    }

    /// Bytes read so far.
    fn position(&self) -> u64 {
        self.read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Up to `n` device lines (blank lines, comments and a CSV header
    /// skipped).
    fn next_batch(&mut self, n: usize) -> anyhow::Result<Vec<ParsedLine>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(text) = self.lines.next() else { break };
            self.number += 1;
            let text = text.map_err(|e| anyhow::anyhow!("line {}: {e}", self.number))?;
            let t = text.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let csv = *self.csv.get_or_insert(!t.starts_with('{'));
            if csv && self.is_header(t) {
                continue;
            }
            let parsed = match csv {
                true => csv_line(t),
                false => json_line(t),
            }
            .and_then(|f| commands(f, self.max_section_bytes));
            out.push((self.number, parsed));
        }
        Ok(out)
    }

    fn is_header(&self, t: &str) -> bool {
        t.split(',')
            .next()
            .is_some_and(|f| f.trim().trim_matches('"').eq_ignore_ascii_case("device_id"))
    }
}

/// A device id and its entitlements as JSON values (`product_id`,
/// `start`, `end`), for the SMS parser to check.
type Fields = (Value, Vec<Map<String, Value>>);

/// `device_id[,product_id,start,end]*` (the csv crate: quoting as RFC 4180).
fn csv_line(t: &str) -> Result<Fields, String> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .trim(csv::Trim::All)
        .from_reader(t.as_bytes());
    let rec = match r.records().next() {
        Some(Ok(rec)) => rec,
        Some(Err(e)) => return Err(format!("not CSV: {e}")),
        None => return Err("empty line".into()),
    };
    let num_or_text = |s: &str| match s.parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => json!(s),
    };
    let fields: Vec<&str> = rec.iter().collect();
    if fields.len() % 3 != 1 {
        return Err(format!(
            "{} fields: expected device_id then product_id,start,end triples",
            fields.len()
        ));
    }
    let ents = fields[1..]
        .chunks(3)
        .map(|c| {
            let mut m = Map::new();
            m.insert("product_id".into(), num_or_text(c[0]));
            m.insert("start".into(), num_or_text(c[1]));
            m.insert("end".into(), num_or_text(c[2]));
            m
        })
        .collect();
    Ok((num_or_text(fields[0]), ents))
}

/// `{"device_id": n, "entitlements": [{…}, …]}` (entitlements optional).
fn json_line(t: &str) -> Result<Fields, String> {
    let mut obj: Map<String, Value> =
        serde_json::from_str(t).map_err(|e| format!("not JSON: {e}"))?;
    let device = obj.remove("device_id").ok_or("`device_id` is missing")?;
    let ents = match obj.remove("entitlements") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|e| match e {
                Value::Object(m) => Ok(m),
                _ => Err("`entitlements` must be an array of objects".to_string()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("`entitlements` must be an array".into()),
    };
    if let Some(k) = obj.keys().next() {
        return Err(format!("unknown field `{k}`"));
    }
    Ok((device, ents))
}

/// The line's adddevice and addentitlement commands, checked by the SMS
/// API's own parser, with content-made transaction ids.
fn commands(
    (device, ents): Fields,
    max_section_bytes: usize,
) -> Result<Vec<CommandRequest>, String> {
    let mut out = Vec::with_capacity(1 + ents.len());
    let body = json!({"transaction_id": "import", "device_id": device});
    out.push(parse(CommandKind::AddDevice, body, max_section_bytes)?);
    for mut e in ents {
        e.insert("transaction_id".into(), json!("import"));
        e.insert("device_id".into(), device.clone());
        out.push(parse(
            CommandKind::AddEntitlement,
            Value::Object(e),
            max_section_bytes,
        )?);
    }
    Ok(out)
}

fn parse(
    kind: CommandKind,
    body: Value,
    max_section_bytes: usize,
) -> Result<CommandRequest, String> {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut req = parse_command(kind, &bytes, max_section_bytes).map_err(|e| e.to_string())?;
    let tid = match &req.command {
        SmsCommand::AddDevice { device_id } => format!("import:add:{}", device_id.get()),
        SmsCommand::AddEntitlement {
            device_id,
            product_id,
            start,
            end,
        } => format!(
            "import:ent:{}:{}:{}:{}",
            device_id.get(),
            product_id.get(),
            start.0,
            end.0
        ),
        _ => return Err("not an import command".into()),
    };
    req.transaction_id = TransactionId::new(&tid).ok_or("transaction id too long")?;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmds(t: &str, csv: bool) -> Result<Vec<CommandRequest>, String> {
        let f = if csv { csv_line(t) } else { json_line(t) };
        f.and_then(|x| commands(x, 1024))
    }

    #[test]
    fn csv_and_json_lines_give_the_same_commands() {
        let a = cmds("7,3,1767225600,2026-02-01T00:00:00Z", true).unwrap();
        let b = cmds(
            r#"{"device_id":7,"entitlements":[{"product_id":3,"start":1767225600,"end":"2026-02-01T00:00:00Z"}]}"#,
            false,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].transaction_id.as_str(), "import:add:7");
        assert_eq!(
            a[1].transaction_id.as_str(),
            "import:ent:7:3:1767225600:1769904000"
        );
        assert_eq!(cmds("9", true).unwrap().len(), 1);
    }

    #[test]
    fn bad_lines_say_why() {
        for (t, csv, why) in [
            ("0", true, "device_id"),
            ("x", true, "device_id"),
            ("7,3,1", true, "fields"),
            ("7,0,1,2", true, "product_id"),
            ("7,3,5,2", true, "end"),
            (r#"{"device_id":7,"extra":1}"#, false, "unknown field"),
            (r#"{"entitlements":[]}"#, false, "device_id"),
            ("{", false, "not JSON"),
        ] {
            let e = cmds(t, csv).unwrap_err();
            assert!(e.contains(why), "{t}: {e}");
        }
    }
}
