//! Leases: one row per job or duty in `leases` (name, holder, fence,
//! expires_at), all times from the database's clock, so instances never
//! compare their own clocks. Used by the Scheduler (one instance runs each
//! job) and by redundant Cyclers (one instance of a pair is on air).
//!
//! - [`acquire`] is one atomic statement (INSERT … ON DUPLICATE KEY
//!   UPDATE): it creates the row, or takes it over only when it has
//!   expired (bumping `fence`), or extends it when the caller already holds
//!   it. It returns the fence when the caller holds the lease afterwards.
//! - [`renew`] extends the lease only if the caller still holds it with the
//!   same fence (never bumps the fence).
//! - [`release`] lets it expire now (an orderly end); a holder that dies
//!   simply stops renewing and loses it `lease` later.
//!
//! Fencing: every write a job makes runs in a transaction that first reads
//! its lease row `FOR UPDATE` and aborts unless `fence` is still its own
//! (`JobCtx::begin`). A take-over is an UPDATE of that row, so it waits for
//! such a transaction to end, and every later write of the old holder sees
//! the new fence and aborts.

use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, TxOpts};

use crate::db::DbError;

/// `host:pid:random`: unique per process even when pids repeat.
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}:{}:{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// The `leases.name` of a scheduler job.
pub fn lease_name(job: &str) -> String {
    format!("job:{job}")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Takes the lease if it is free or expired, extends it if `holder`
/// already holds it. `Some(fence)` when `holder` holds it afterwards.
pub async fn acquire(
    conn: &mut Conn,
    name: &str,
    holder: &str,
    lease: Duration,
) -> Result<Option<u64>, DbError> {
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    // The assignments only read columns not assigned before them (or, for
    // expires_at, a condition that is the same whichever value of holder it
    // sees), so the statement means the same under either reading of
    // ON DUPLICATE KEY UPDATE's evaluation order.
    tx.exec_drop(
        "INSERT INTO leases (name, holder, fence, expires_at) \
         VALUES (?, ?, 1, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND) \
         ON DUPLICATE KEY UPDATE \
           fence = IF(expires_at <= UTC_TIMESTAMP(6), fence + 1, fence), \
           holder = IF(expires_at <= UTC_TIMESTAMP(6), VALUES(holder), holder), \
           expires_at = IF(expires_at <= UTC_TIMESTAMP(6) OR holder = VALUES(holder), \
                           VALUES(expires_at), expires_at)",
        (name, holder, micros(lease)),
    )
    .await?;
    let row: Option<(String, u64)> = tx
        .exec_first("SELECT holder, fence FROM leases WHERE name = ?", (name,))
        .await?;
    tx.commit().await?;
    Ok(row.filter(|(h, _)| h == holder).map(|(_, f)| f))
}

/// Extends the lease if `holder` still holds it with `fence`; false when
/// it was taken over.
pub async fn renew(
    conn: &mut Conn,
    name: &str,
    holder: &str,
    fence: u64,
    lease: Duration,
) -> Result<bool, DbError> {
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    tx.exec_drop(
        "UPDATE leases SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
         WHERE name = ? AND holder = ? AND fence = ?",
        (micros(lease), name, holder, fence),
    )
    .await?;
    let row: Option<(String, u64)> = tx
        .exec_first("SELECT holder, fence FROM leases WHERE name = ?", (name,))
        .await?;
    tx.commit().await?;
    Ok(row.is_some_and(|(h, f)| h == holder && f == fence))
}

/// Lets the lease expire now, if `holder` still holds it with `fence`.
pub async fn release(conn: &mut Conn, name: &str, holder: &str, fence: u64) -> Result<(), DbError> {
    conn.exec_drop(
        "UPDATE leases SET expires_at = UTC_TIMESTAMP(6) \
         WHERE name = ? AND holder = ? AND fence = ?",
        (name, holder, fence),
    )
    .await?;
    Ok(())
}
