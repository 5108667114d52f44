//! Which server casd writes to.
//!
//! One server (`database.url` alone): that one, never questioned (the
//! server's own `read_only` still refuses writes, see below). A replication
//! group (`database.servers`): the member whose `read_only` is OFF. It is
//! found before first use, again when a connection to it fails, and by the
//! watcher every [`TOPOLOGY_CHECK`]; until one is found, every connection
//! attempt fails as `Unreachable` (the API answers 503, the EMMG and
//! Scheduler retry, the Cycler plays from memory, `/readyz` is not ready).
//!
//! The race where the primary turns read-only between a check and a write
//! is closed by the server: the casd user has no privilege that bypasses
//! `read_only` (no SUPER, no READ ONLY ADMIN: scripts/mariadb.sh), so the
//! write fails with 1290, classified [`super::DbErrorKind::ReadOnly`] and
//! handled like an unavailable database; the next check moves the pool to
//! the new primary. Two writable members at once (a fenced primary that
//! was made writable again by hand) is refused: casd then writes to
//! neither until one is read-only again.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, Pool};

use super::DbError;

/// How often the watcher checks the writable server (and semi-sync).
pub const TOPOLOGY_CHECK: Duration = Duration::from_millis(500);

/// The state of semi-synchronous replication on the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SemiSync {
    /// Each commit waits for a replica's ack (AFTER_SYNC): a 200 means
    /// the command is on the primary and on a replica.
    Active,
    /// Enabled, but no ack came within `rpl_semi_sync_master_timeout`:
    /// the primary commits alone until a replica catches up.
    FellBack,
}

/// `host:port` (a name or an IP; brackets around an IPv6 address).
pub fn parse_server(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0).then(|| (host.to_owned(), port))
}

/// One member as configured.
struct Member {
    opts: Opts,
    display: String,
}

/// The server written to now.
#[derive(Clone)]
pub(super) struct Current {
    /// Bumped at every change, so that callers who saw a failure switch
    /// only once between them.
    pub epoch: u64,
    /// False while no writable member is known (a group only).
    pub known: bool,
    pub index: usize,
    pub pool: Pool,
    pub opts: Opts,
    pub display: String,
}

pub(super) struct Topology {
    members: Vec<Member>,
    group: bool,
    db_name: Option<String>,
    current: RwLock<Current>,
    /// One search for the writable member at a time.
    switching: tokio::sync::Mutex<()>,
    /// 0 unknown / not enabled, 1 active, 2 fell back.
    semi_sync: AtomicU8,
}

/// What a member said when asked.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Probe {
    Writable,
    ReadOnly,
    Unreachable(String),
}

impl Topology {
    pub(super) fn new(
        builder: OptsBuilder,
        url: &str,
        servers: &[String],
    ) -> Result<Topology, DbError> {
        let mut members = Vec::new();
        for s in servers {
            let (host, port) = parse_server(s)
                .ok_or_else(|| DbError::Unreachable(format!("{s:?} is not host:port")))?;
            let opts = Opts::from(builder.clone().ip_or_hostname(host).tcp_port(port));
            members.push(Member {
                display: redact(&opts),
                opts,
            });
        }
        let group = !members.is_empty();
        if !group {
            let opts = Opts::from(builder);
            members.push(Member {
                opts,
                display: crate::config::redact_url(url),
            });
        }
        let first = &members[0];
        let current = Current {
            epoch: 0,
            known: !group,
            index: 0,
            pool: Pool::new(first.opts.clone()),
            opts: first.opts.clone(),
            display: first.display.clone(),
        };
        Ok(Topology {
            db_name: first.opts.db_name().map(str::to_owned),
            members,
            group,
            current: RwLock::new(current),
            switching: tokio::sync::Mutex::new(()),
            semi_sync: AtomicU8::new(0),
        })
    }

    pub(super) fn db_name(&self) -> Option<&str> {
        self.db_name.as_deref()
    }

    pub(super) fn is_group(&self) -> bool {
        self.group
    }

    pub(super) fn current(&self) -> Current {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_current(&self, c: Current) {
        match self.current.write() {
            Ok(mut g) => *g = c,
            Err(p) => *p.into_inner() = c,
        }
    }

    pub(super) fn semi_sync(&self) -> Option<SemiSync> {
        match self.semi_sync.load(Ordering::Relaxed) {
            1 => Some(SemiSync::Active),
            2 => Some(SemiSync::FellBack),
            _ => None,
        }
    }

    /// The writable server, searched for if none is known.
    pub(super) async fn ensure_primary(&self, timeout: Duration) -> Result<Current, DbError> {
        let c = self.current();
        if c.known {
            return Ok(c);
        }
        self.switch(c.epoch, timeout).await
    }

    /// Asks every member whether it is writable and moves the pool to the
    /// one that is, unless another caller already moved it since `seen`.
    pub(super) async fn switch(&self, seen: u64, timeout: Duration) -> Result<Current, DbError> {
        let _one = self.switching.lock().await;
        let c = self.current();
        if c.epoch != seen && c.known {
            return Ok(c);
        }
        let probes = self.probe_all(timeout).await;
        match choose(&probes) {
            Ok(i) if c.known && i == c.index => Ok(c),
            Ok(i) => Ok(self.move_to(i, &c)),
            Err(why) => {
                let names: Vec<String> = probes
                    .iter()
                    .zip(&self.members)
                    .map(|(p, m)| format!("{}: {}", m.display, describe(p)))
                    .collect();
                let why = format!("{why} ({})", names.join("; "));
                if c.known {
                    tracing::warn!("database: {why}; refusing writes until a primary is found");
                    self.set_current(Current {
                        epoch: c.epoch + 1,
                        known: false,
                        ..c
                    });
                }
                Err(DbError::Unreachable(why))
            }
        }
    }

    fn move_to(&self, i: usize, old: &Current) -> Current {
        let m = &self.members[i];
        if old.epoch == 0 {
            tracing::info!("database: writing to {} (read_only = OFF)", m.display);
        } else {
            tracing::warn!(
                "database: the writable server (read_only = OFF) is now {}; casd writes there",
                m.display
            );
        }
        let next = Current {
            epoch: old.epoch + 1,
            known: true,
            index: i,
            pool: Pool::new(m.opts.clone()),
            opts: m.opts.clone(),
            display: m.display.clone(),
        };
        self.set_current(next.clone());
        let stale = old.pool.clone();
        tokio::spawn(async move {
            let _ = stale.disconnect().await;
        });
        next
    }

    async fn probe_all(&self, timeout: Duration) -> Vec<Probe> {
        let mut set = tokio::task::JoinSet::new();
        for (i, m) in self.members.iter().enumerate() {
            let opts = m.opts.clone();
            set.spawn(async move {
                let p = match tokio::time::timeout(timeout, probe(opts)).await {
                    Ok(p) => p,
                    Err(_) => Probe::Unreachable(format!("no answer within {timeout:?}")),
                };
                (i, p)
            });
        }
        let mut out = vec![Probe::Unreachable("not asked".into()); self.members.len()];
        while let Some(r) = set.join_next().await {
            if let Ok((i, p)) = r {
                out[i] = p;
            }
        }
        out
    }

    /// One watcher round: the current server still writable (else search
    /// again), and its semi-sync state.
    pub(super) async fn check(&self, timeout: Duration) {
        let c = self.current();
        if !c.known {
            let _ = self.switch(c.epoch, timeout).await;
            return;
        }
        let read = async {
            let mut conn = c.pool.get_conn().await?;
            let row: Option<(u8, u8, Option<String>)> = conn
                .query_first(
                    "SELECT @@global.read_only, @@global.rpl_semi_sync_master_enabled, \
                     (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS \
                      WHERE VARIABLE_NAME = 'RPL_SEMI_SYNC_MASTER_STATUS')",
                )
                .await?;
            Ok::<_, mysql_async::Error>(row)
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(Some((read_only, enabled, status)))) => {
                self.note_semi_sync(&c.display, enabled == 1, status.as_deref() == Some("ON"));
                if read_only != 0 && self.group {
                    let _ = self.switch(c.epoch, timeout).await;
                }
            }
            _ if self.group => {
                let _ = self.switch(c.epoch, timeout).await;
            }
            _ => {}
        }
    }

    /// Records the primary's semi-sync state; logs a change.
    fn note_semi_sync(&self, at: &str, enabled: bool, on: bool) {
        let now = match (enabled, on) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => 2,
        };
        let before = self.semi_sync.swap(now, Ordering::Relaxed);
        if now == 2 && before != 2 {
            tracing::warn!(
                "database: semi-synchronous replication on {at} fell back to asynchronous \
                 (no replica acknowledged within rpl_semi_sync_master_timeout): a 200 now means \
                 the command is on the primary only"
            );
        } else if now == 1 && before == 2 {
            tracing::info!("database: semi-synchronous replication on {at} is active again");
        }
    }

    pub(super) async fn close(&self) {
        let _ = self.current().pool.disconnect().await;
    }
}

/// A member's answer to `SELECT @@global.read_only` on a connection of
/// its own.
async fn probe(opts: Opts) -> Probe {
    let mut conn = match Conn::new(opts).await {
        Ok(c) => c,
        Err(e) => return Probe::Unreachable(e.to_string()),
    };
    let ro: Result<Option<u8>, _> = conn.query_first("SELECT @@global.read_only").await;
    let _ = conn.disconnect().await;
    match ro {
        Ok(Some(0)) => Probe::Writable,
        Ok(_) => Probe::ReadOnly,
        Err(e) => Probe::Unreachable(e.to_string()),
    }
}

/// The one writable member, or why there is none to write to.
fn choose(probes: &[Probe]) -> Result<usize, &'static str> {
    let writable: Vec<usize> = probes
        .iter()
        .enumerate()
        .filter(|(_, p)| **p == Probe::Writable)
        .map(|(i, _)| i)
        .collect();
    match writable.as_slice() {
        [one] => Ok(*one),
        [] => Err("no writable database server"),
        _ => Err("several writable database servers (fence all but one)"),
    }
}

fn describe(p: &Probe) -> String {
    match p {
        Probe::Writable => "writable".into(),
        Probe::ReadOnly => "read-only".into(),
        Probe::Unreachable(e) => format!("unreachable: {e}"),
    }
}

fn redact(opts: &Opts) -> String {
    format!(
        "mysql://{}@{}:{}/{}",
        opts.user().unwrap_or(""),
        opts.ip_or_hostname(),
        opts.tcp_port(),
        opts.db_name().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_writable_member_is_chosen() {
        use Probe::*;
        let down = || Unreachable("refused".into());
        assert_eq!(choose(&[ReadOnly, Writable]), Ok(1));
        assert_eq!(choose(&[down(), Writable, ReadOnly]), Ok(1));
        assert!(choose(&[ReadOnly, down()]).is_err());
        assert!(choose(&[]).is_err());
        // A fenced primary made writable by hand next to the new one:
        // neither is written to.
        assert!(choose(&[Writable, Writable])
            .unwrap_err()
            .contains("several"));
    }

    #[tokio::test]
    async fn semi_sync_state_follows_the_primary() {
        let url = "mysql://u:p@127.0.0.1:1/d";
        let b = OptsBuilder::from_opts(Opts::from_url(url).unwrap());
        let servers = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let t = Topology::new(b, url, &servers).unwrap();
        assert!(t.is_group() && !t.current().known);
        assert_eq!(t.semi_sync(), None);
        t.note_semi_sync("a", true, true);
        assert_eq!(t.semi_sync(), Some(SemiSync::Active));
        t.note_semi_sync("a", true, false); // logs the fall back
        assert_eq!(t.semi_sync(), Some(SemiSync::FellBack));
        t.note_semi_sync("a", false, false);
        assert_eq!(t.semi_sync(), None);
    }

    #[test]
    fn servers_are_host_and_port() {
        assert_eq!(
            parse_server("127.0.0.1:3306"),
            Some(("127.0.0.1".into(), 3306))
        );
        assert_eq!(
            parse_server("db-a.example:3307"),
            Some(("db-a.example".into(), 3307))
        );
        assert_eq!(parse_server("[::1]:3306"), Some(("::1".into(), 3306)));
        assert_eq!(parse_server("db-a"), None);
        assert_eq!(parse_server("db-a:0"), None);
        assert_eq!(parse_server(":3306"), None);
    }
}
