//! The database boundary: the mysql_async pool and the migrations runner.
//!
//! Every role gets a [`Db`] (a cheap clone of one pool). Migrations are SQL
//! files under `migrations/`, embedded at build time and listed in
//! [`MIGRATIONS`]; they are applied in order under a named server lock
//! (`GET_LOCK`, scoped to the database) so two processes starting at once
//! never apply one twice, and each applied file is recorded with its checksum
//! in `schema_migrations` — a file edited after it was applied stops start-up.

pub mod promote;
mod topology;

use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, SslOpts};
use sha2::{Digest, Sha256};

use topology::Topology;
pub use topology::{parse_server, SemiSync, TOPOLOGY_CHECK};

/// Errors at the database boundary. The URL (with its password) never
/// appears in them.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unreachable: {0}")]
    Unreachable(String),
    #[error("database error: {0}")]
    Query(#[from] mysql_async::Error),
    #[error("migration {version:04} ({name}): {message}")]
    Migration {
        version: u32,
        name: &'static str,
        message: String,
    },
}

impl DbError {
    /// True when the error means "the database is not there right now"
    /// (connection refused/reset, pool timeout), as opposed to a bad query:
    /// callers map it to 503 and retry.
    pub fn is_unavailable(&self) -> bool {
        self.kind() == DbErrorKind::Unavailable
    }

    /// What kind of failure this is (see [`classify`]).
    pub fn kind(&self) -> DbErrorKind {
        match self {
            DbError::Unreachable(_) => DbErrorKind::Unavailable,
            DbError::Query(e) => match classify(e) {
                // Not there for writing: the same to callers.
                DbErrorKind::ReadOnly => DbErrorKind::Unavailable,
                k => k,
            },
            DbError::Migration { .. } => DbErrorKind::Other,
        }
    }
}

/// The kinds of database failure the code reacts to; every other error is
/// `Other`. The one place that knows MariaDB's error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbErrorKind {
    /// The database is not there right now: connection refused, reset or
    /// lost, too many connections, shutdown in progress. Retry later.
    Unavailable,
    /// 1213: chosen as a deadlock victim; the transaction was rolled back.
    Deadlock,
    /// 1205: a lock wait timed out.
    LockWaitTimeout,
    /// 1062: a unique key already holds the value.
    Duplicate,
    /// 1146: no such table (or sequence engine table such as `seq_1_to_N`).
    NoSuchTable,
    /// 1290 (ER_OPTION_PREVENTS_STATEMENT): the server runs read-only — it
    /// was a primary and has been fenced, or turned replica. Handled like
    /// `Unavailable` (503, retry): the writable server is found anew.
    ReadOnly,
    Other,
}

impl DbErrorKind {
    /// Deadlock or lock wait timeout: the transaction lost a race and can
    /// simply be run again.
    pub fn is_conflict(self) -> bool {
        matches!(self, DbErrorKind::Deadlock | DbErrorKind::LockWaitTimeout)
    }
}

/// Classifies a driver error (see [`DbErrorKind`]).
pub fn classify(e: &mysql_async::Error) -> DbErrorKind {
    match e {
        mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => DbErrorKind::Unavailable,
        mysql_async::Error::Server(s) => match s.code {
            // 1040 too many connections, 1053 shutdown in progress,
            // 2006/2013 gone away / lost, 1927 connection killed.
            1040 | 1053 | 2006 | 2013 | 1927 => DbErrorKind::Unavailable,
            1213 => DbErrorKind::Deadlock,
            1205 => DbErrorKind::LockWaitTimeout,
            1062 => DbErrorKind::Duplicate,
            1146 => DbErrorKind::NoSuchTable,
            1290 => DbErrorKind::ReadOnly,
            _ => DbErrorKind::Other,
        },
        _ => DbErrorKind::Other,
    }
}

/// One embedded migration file.
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. A test checks this list against `migrations/`.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/0001_init.sql"),
    },
    Migration {
        version: 3,
        name: "auth",
        sql: include_str!("../migrations/0003_auth.sql"),
    },
    Migration {
        version: 4,
        name: "scheduler",
        sql: include_str!("../migrations/0004_scheduler.sql"),
    },
    Migration {
        version: 5,
        name: "indexes",
        sql: include_str!("../migrations/0005_indexes.sql"),
    },
    Migration {
        version: 6,
        name: "request_ids",
        sql: include_str!("../migrations/0006_request_ids.sql"),
    },
    Migration {
        version: 7,
        name: "revocations",
        sql: include_str!("../migrations/0007_revocations.sql"),
    },
    Migration {
        version: 8,
        name: "imports",
        sql: include_str!("../migrations/0008_imports.sql"),
    },
];

/// TLS to the server, from `database.tls` and `database.tls_ca`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbTls {
    /// Plain TCP; the driver may move to the server's unix socket when the
    /// server is local.
    Disabled,
    /// TLS on every connection, the server's certificate checked against
    /// `ca` (PEM; `None`: the web PKI roots) and the URL's host; a server
    /// without TLS is refused.
    Required { ca: Option<std::path::PathBuf> },
}

impl DbTls {
    pub fn from_config(c: &crate::config::DatabaseConfig) -> DbTls {
        match c.tls {
            crate::config::DbTlsMode::Disabled => DbTls::Disabled,
            crate::config::DbTlsMode::Required => DbTls::Required {
                ca: c.tls_ca.clone(),
            },
        }
    }

    /// These TLS settings on a connection's options.
    pub fn apply(&self, builder: OptsBuilder) -> OptsBuilder {
        match self {
            DbTls::Disabled => builder,
            DbTls::Required { ca } => {
                let ssl = match ca {
                    Some(ca) => SslOpts::default()
                        .with_root_certs(vec![ca.clone().into()])
                        .with_disable_built_in_roots(true),
                    None => SslOpts::default(),
                };
                // No move to the unix socket after connecting: every
                // connection is the verified TLS one.
                builder.ssl_opts(ssl).prefer_socket(false)
            }
        }
    }
}

/// A connection error as `Unreachable`; a server without TLS while TLS is
/// required says so in words.
fn unreachable(e: mysql_async::Error) -> DbError {
    match e {
        mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer) => {
            DbError::Unreachable(
                "the server does not offer TLS, and database.tls = \"required\" refuses a plain connection"
                    .into(),
            )
        }
        e => DbError::Unreachable(e.to_string()),
    }
}

/// A handle on the database: one pool, cloned into every role.
///
/// With `database.servers` (a replication group) the pool is the one of
/// the group's writable member: [`Db::conn`] finds it before first use and
/// again when a connection to it fails, and [`Db::watch`] checks it every
/// [`TOPOLOGY_CHECK`], so that casd follows a failover by itself and never
/// writes to a read-only member (see `db/topology.rs`).
#[derive(Clone)]
pub struct Db {
    topology: Arc<Topology>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("at", &self.display()).finish()
    }
}

impl Db {
    /// Builds the pool. No connection is made until first use; call
    /// [`Db::ping`] to check reachability.
    pub fn new(url: &str, pool_max: usize, connect_timeout: Duration) -> Result<Db, DbError> {
        Db::with_tls(url, &DbTls::Disabled, pool_max, connect_timeout)
    }

    /// [`Db::new`] with TLS (`database.tls`, `database.tls_ca`).
    pub fn with_tls(
        url: &str,
        tls: &DbTls,
        pool_max: usize,
        connect_timeout: Duration,
    ) -> Result<Db, DbError> {
        Db::with_servers(url, tls, &[], pool_max, connect_timeout)
    }

    /// [`Db::with_tls`] for a replication group: `servers` (`host:port`
    /// each) replace the url's host; the url gives user, password and
    /// database. No server: the url's own, never checked for `read_only`.
    pub fn with_servers(
        url: &str,
        tls: &DbTls,
        servers: &[String],
        pool_max: usize,
        connect_timeout: Duration,
    ) -> Result<Db, DbError> {
        let opts = Opts::from_url(url)
            .map_err(|_| DbError::Unreachable("database URL is not a valid mysql:// URL".into()))?;
        let constraints = PoolConstraints::new(0, pool_max.max(1))
            .ok_or_else(|| DbError::Unreachable("bad pool size".into()))?;
        let builder = OptsBuilder::from_opts(opts)
            .pool_opts(
                // The default COM_RESET_CONNECTION when a connection returns
                // to the pool stays on: a session can never leak state (an
                // open snapshot, a variable) into the next user. Hot paths
                // that end every transaction themselves (the SMS accept)
                // opt out per connection to keep their prepared statements.
                //
                // A non-zero inactive TTL keeps returned connections for
                // reuse (up to `pool_max`, trimmed after a minute idle):
                // with the default of zero and a minimum of zero, the pool
                // closed every connection as it came back, so each use paid
                // for a new TCP connection, authentication and init.
                PoolOpts::default()
                    .with_constraints(constraints)
                    .with_inactive_connection_ttl(Duration::from_secs(60))
                    .with_ttl_check_interval(Duration::from_secs(10)),
            )
            // Keep the server's time zone out of our DATETIMEs: all UTC.
            .init(vec!["SET time_zone = '+00:00'"])
            .tcp_nodelay(true)
            .stmt_cache_size(256);
        let topology = Topology::new(tls.apply(builder), url, servers)?;
        Ok(Db {
            topology: Arc::new(topology),
            connect_timeout,
        })
    }

    /// Where the database is (the writable member of a group), password
    /// removed.
    pub fn display(&self) -> String {
        self.topology.current().display
    }

    /// The database's name (tests tell their throwaway databases apart
    /// by it: see [`crate::failpoint`]).
    pub fn database_name(&self) -> Option<&str> {
        self.topology.db_name()
    }

    /// The pool of the current (writable) server.
    pub fn pool(&self) -> Pool {
        self.topology.current().pool
    }

    /// A pooled connection, or `Unreachable` after the connect timeout.
    /// In a replication group: a connection to the writable member, found
    /// anew when the one known fails.
    pub async fn conn(&self) -> Result<Conn, DbError> {
        let at = self.topology.ensure_primary(self.connect_timeout).await?;
        match self.within(at.pool.get_conn()).await {
            Err(e) if self.topology.is_group() => {
                tracing::debug!("database: {e}; looking for the writable server");
                let now = self.topology.switch(at.epoch, self.connect_timeout).await?;
                self.within(now.pool.get_conn()).await
            }
            other => other,
        }
    }

    /// A connection of its own, outside the pool (same options, same init):
    /// for a task on another runtime (the SMS committer's thread), whose
    /// sockets must not end up in a pool shared with this one.
    pub async fn connect_own(&self) -> Result<Conn, DbError> {
        let at = self.topology.ensure_primary(self.connect_timeout).await?;
        match self.within(Conn::new(at.opts.clone())).await {
            Err(e) if self.topology.is_group() => {
                tracing::debug!("database: {e}; looking for the writable server");
                let now = self.topology.switch(at.epoch, self.connect_timeout).await?;
                self.within(Conn::new(now.opts)).await
            }
            other => other,
        }
    }

    async fn within<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, mysql_async::Error>>,
    ) -> Result<T, DbError> {
        match tokio::time::timeout(self.connect_timeout, f).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(unreachable(e)),
            Err(_) => Err(DbError::Unreachable(format!(
                "no connection within {} s",
                self.connect_timeout.as_secs()
            ))),
        }
    }

    /// `SELECT 1` round trip.
    pub async fn ping(&self) -> Result<(), DbError> {
        let mut c = self.conn().await?;
        let _: Option<u8> = c
            .query_first("SELECT 1")
            .await
            .map_err(|e| DbError::Unreachable(e.to_string()))?;
        Ok(())
    }

    /// The primary's semi-synchronous replication as last seen by
    /// [`Db::watch`] (`None`: not enabled there, or not known yet).
    pub fn semi_sync(&self) -> Option<SemiSync> {
        self.topology.semi_sync()
    }

    /// Checks the writable server every [`TOPOLOGY_CHECK`] until
    /// `shutdown`: a group follows a failover (or a member turned
    /// read-only) within that time even while no role uses the database,
    /// and a fall back of semi-synchronous replication to asynchronous is
    /// logged (and read by the metrics).
    pub fn watch(&self, shutdown: tokio_util::sync::CancellationToken) {
        let db = self.clone();
        tokio::spawn(async move {
            loop {
                db.topology.check(db.connect_timeout).await;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(TOPOLOGY_CHECK) => {}
                }
            }
        });
    }

    /// Applies every pending migration; returns the versions applied now.
    pub async fn migrate(&self) -> Result<Vec<u32>, DbError> {
        let mut c = self.conn().await?;
        let got: Option<Option<i64>> = c
            .query_first("SELECT GET_LOCK(CONCAT('casd.migrate.', DATABASE()), 120)")
            .await?;
        if got.flatten() != Some(1) {
            return Err(DbError::Unreachable(
                "could not take the migration lock within 120 s".into(),
            ));
        }
        let result = apply_pending(&mut c).await;
        // Released explicitly; also released if the connection dies.
        let _: Option<Option<i64>> = c
            .query_first("SELECT RELEASE_LOCK(CONCAT('casd.migrate.', DATABASE()))")
            .await?;
        result
    }

    /// True when every embedded migration is recorded as applied.
    pub async fn migrations_current(&self) -> Result<bool, DbError> {
        let mut c = self.conn().await?;
        let n: Option<u64> = c
            .query_first("SELECT COUNT(*) FROM schema_migrations")
            .await
            .or_else(|e| match classify(&e) {
                DbErrorKind::NoSuchTable => Ok(Some(0)),
                _ => Err(e),
            })?;
        Ok(n.unwrap_or(0) as usize >= MIGRATIONS.len())
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(self) {
        self.topology.close().await;
    }
}

fn checksum(sql: &str) -> Vec<u8> {
    Sha256::digest(sql.as_bytes()).to_vec()
}

/// Checksums (hex SHA-256) that migration files had before an edit of their
/// whole-line comments only: no statement changed (`split_statements` drops
/// those lines). A database that applied the earlier text is accepted and
/// its record moved to the current text; any other difference still stops
/// start-up.
const COMMENT_ONLY_EDITS: &[(u32, &str)] = &[
    // 0001: two comments cited a document that is not in the repository;
    // they cite docs/format.md now.
    (
        1,
        "bff6bfe157fca36744fa89c3462ae052aaea7e4ea3c15709ecdc358fa8fcf37e",
    ),
];

/// Whether a recorded checksum `sum` of migration `version` is one its file
/// had before a comment-only edit.
fn comment_only_edit(version: u32, sum: &[u8]) -> bool {
    COMMENT_ONLY_EDITS
        .iter()
        .any(|(v, old)| *v == version && hex::encode(sum) == *old)
}

async fn apply_pending(c: &mut Conn) -> Result<Vec<u32>, DbError> {
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INT UNSIGNED NOT NULL PRIMARY KEY,
            name VARCHAR(128) NOT NULL,
            checksum BINARY(32) NOT NULL,
            applied_at DATETIME(6) NOT NULL
        ) ENGINE=InnoDB",
    )
    .await?;
    let applied: Vec<(u32, Vec<u8>)> = c
        .query("SELECT version, checksum FROM schema_migrations ORDER BY version")
        .await?;
    let mut done = Vec::new();
    for m in MIGRATIONS {
        if let Some((_, sum)) = applied.iter().find(|(v, _)| *v == m.version) {
            if *sum != checksum(m.sql) && comment_only_edit(m.version, sum) {
                c.exec_drop(
                    "UPDATE schema_migrations SET checksum = ? WHERE version = ?",
                    (checksum(m.sql), m.version),
                )
                .await?;
            } else if *sum != checksum(m.sql) {
                return Err(DbError::Migration {
                    version: m.version,
                    name: m.name,
                    message: "file changed after it was applied; add a new migration instead"
                        .into(),
                });
            }
            continue;
        }
        for stmt in split_statements(m.sql) {
            c.query_drop(stmt).await.map_err(|e| DbError::Migration {
                version: m.version,
                name: m.name,
                message: e.to_string(),
            })?;
        }
        c.exec_drop(
            "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, UTC_TIMESTAMP(6))",
            (m.version, m.name, checksum(m.sql)),
        )
        .await?;
        done.push(m.version);
    }
    Ok(done)
}

/// Splits a migration file into statements: `--` comment lines dropped,
/// statements end with `;` at the end of a line. Migration files must not
/// put `;` at a line end inside a string literal.
pub fn split_statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in sql.lines() {
        let t = line.trim();
        if t.starts_with("--") || t.is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if t.ends_with(';') {
            let s = cur.trim().trim_end_matches(';').trim().to_owned();
            if !s.is_empty() {
                out.push(s);
            }
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_file_is_listed_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.name))
            .collect();
        assert_eq!(files, listed);
    }

    #[test]
    fn server_codes_are_classified() {
        let server = |code| {
            mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: String::new(),
                state: String::new(),
            })
        };
        assert_eq!(classify(&server(1213)), DbErrorKind::Deadlock);
        assert_eq!(classify(&server(1205)), DbErrorKind::LockWaitTimeout);
        assert_eq!(classify(&server(1062)), DbErrorKind::Duplicate);
        assert_eq!(classify(&server(1146)), DbErrorKind::NoSuchTable);
        assert_eq!(classify(&server(2013)), DbErrorKind::Unavailable);
        assert_eq!(classify(&server(1290)), DbErrorKind::ReadOnly);
        assert!(DbError::Query(server(1290)).is_unavailable());
        assert_eq!(classify(&server(1064)), DbErrorKind::Other);
        assert!(DbErrorKind::Deadlock.is_conflict() && DbErrorKind::LockWaitTimeout.is_conflict());
        assert!(!DbErrorKind::Duplicate.is_conflict());
        assert!(DbError::Unreachable("x".into()).is_unavailable());
        assert!(!DbError::Query(server(1062)).is_unavailable());
    }

    #[test]
    fn splitter_drops_comments_and_splits() {
        let s = split_statements(
            "-- c\nCREATE TABLE a (x INT); \n\n-- d\nCREATE TABLE b (\n y INT\n);\n",
        );
        assert_eq!(
            s,
            vec!["CREATE TABLE a (x INT)", "CREATE TABLE b (\n y INT\n)"]
        );
    }
}
