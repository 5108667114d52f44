//! `casd db promote`: failover of a replication group with MariaDB's own
//! statements, as an administrator (the casd user cannot: it has no
//! privilege over `read_only`).
//!
//! 1. Ask every member of `database.servers`: reachable? read-only? what
//!    did it receive (`gtid_current_pos` merged with the replica's
//!    `Gtid_IO_Pos`)? A writable member that answers stops the promotion:
//!    the primary is alive (fence it first, or it is a switchover).
//! 2. Promote the most advanced replica: stop its I/O thread, wait until
//!    its SQL thread has applied everything it received
//!    (`MASTER_GTID_WAIT`: every transaction a 200 was given for is in
//!    its relay log, AFTER_SYNC), drop its replica configuration, turn on
//!    the semi-sync master side, `read_only = OFF`.
//! 3. Re-point every other reachable replica at it (GTID, `slave_pos`).
//!
//! Fencing of the old primary is by configuration: every member starts
//! read-only (scripts/mariadb.sh, docs/operations.md), so a primary that
//! comes back after the promotion takes no write, and the casd user cannot
//! override that. casd (with `database.servers`) moves to the new primary
//! by itself within [`super::TOPOLOGY_CHECK`].

use std::collections::BTreeMap;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, Row};

/// A GTID position: the highest sequence number per replication domain.
pub type GtidPos = BTreeMap<u32, u64>;

/// Parses `0-1-100,1-2-5` (domain-server-seq, comma separated).
pub fn parse_gtid_pos(s: &str) -> GtidPos {
    let mut out = GtidPos::new();
    for g in s.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        let mut p = g.split('-');
        if let (Some(Ok(d)), Some(_), Some(Ok(n))) = (
            p.next().map(str::parse::<u32>),
            p.next(),
            p.next().map(str::parse::<u64>),
        ) {
            let e = out.entry(d).or_insert(0);
            *e = (*e).max(n);
        }
    }
    out
}

/// The index of the most advanced position: the one no other is ahead of
/// in any domain, ties to the first; `None` when two diverge (each ahead
/// in a domain), which a human must look at.
pub fn most_advanced(positions: &[GtidPos]) -> Option<usize> {
    let ahead =
        |a: &GtidPos, b: &GtidPos| b.iter().any(|(d, n)| a.get(d).copied().unwrap_or(0) < *n);
    (0..positions.len()).find(|&i| positions.iter().all(|other| !ahead(&positions[i], other)))
}

/// One member as found.
struct Found {
    at: String,
    conn: Option<Conn>,
    read_only: bool,
    received: GtidPos,
}

/// Promotes the most advanced replica of `servers` and re-points the
/// others; returns what was done, one line each.
pub async fn promote(
    servers: &[String],
    tls: &super::DbTls,
    user: &str,
    password: &str,
    wait: Duration,
) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(
        !servers.is_empty(),
        "database.servers is empty: nothing to promote"
    );
    let mut found = Vec::new();
    for s in servers {
        found.push(inspect(s, tls, user, password).await);
    }
    if let Some(alive) = found.iter().find(|f| f.conn.is_some() && !f.read_only) {
        anyhow::bail!(
            "{} is writable (read_only = OFF): the primary is alive; set it read-only first \
             (SET GLOBAL read_only = ON) if it must be replaced",
            alive.at
        );
    }
    let replicas: Vec<usize> = (0..found.len())
        .filter(|&i| found[i].conn.is_some())
        .collect();
    anyhow::ensure!(
        !replicas.is_empty(),
        "no member of database.servers answers"
    );
    let positions: Vec<GtidPos> = replicas
        .iter()
        .map(|&i| found[i].received.clone())
        .collect();
    let best = most_advanced(&positions)
        .map(|k| replicas[k])
        .ok_or_else(|| {
            anyhow::anyhow!("the replicas' GTID positions diverge: {positions:?}; resolve by hand")
        })?;
    let mut report = Vec::new();
    let best_at = found[best].at.clone();
    let (host, port) = super::parse_server(&best_at)
        .ok_or_else(|| anyhow::anyhow!("{best_at} is not host:port"))?;
    let mut new_primary = found[best].conn.take().expect("reachable");
    make_primary(&mut new_primary, wait).await?;
    report.push(format!("promoted {best_at} (read_only = OFF)"));
    for f in found.iter_mut() {
        match f.conn.take() {
            Some(mut c) => {
                c.query_drop(format!(
                    "STOP SLAVE; CHANGE MASTER TO MASTER_HOST = '{host}', MASTER_PORT = {port}, \
                     MASTER_USE_GTID = slave_pos; START SLAVE"
                ))
                .await?;
                report.push(format!("{} now replicates from {best_at}", f.at));
                let _ = c.disconnect().await;
            }
            None if f.at != best_at => report.push(format!(
                "{} unreachable: it restarts read-only (fenced); rebuild it as a replica",
                f.at
            )),
            None => {}
        }
    }
    let _ = new_primary.disconnect().await;
    Ok(report)
}

/// Connects as the administrator and reads what the member is.
async fn inspect(at: &str, tls: &super::DbTls, user: &str, password: &str) -> Found {
    let mut f = Found {
        at: at.to_owned(),
        conn: None,
        read_only: true,
        received: GtidPos::new(),
    };
    let Some((host, port)) = super::parse_server(at) else {
        return f;
    };
    let builder = OptsBuilder::default()
        .ip_or_hostname(host)
        .tcp_port(port)
        .user(Some(user))
        .pass(Some(password));
    let opts: Opts = tls.apply(builder).into();
    let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(5), Conn::new(opts)).await else {
        return f;
    };
    let status: Result<Option<(u8, String)>, _> = c
        .query_first("SELECT @@global.read_only, @@global.gtid_current_pos")
        .await;
    let slave: Result<Option<Row>, _> = c.query_first("SHOW SLAVE STATUS").await;
    if let (Ok(Some((ro, current))), Ok(slave)) = (status, slave) {
        let io = slave
            .and_then(|r| r.get_opt::<String, _>("Gtid_IO_Pos"))
            .and_then(Result::ok)
            .unwrap_or_default();
        f.read_only = ro != 0;
        f.received = parse_gtid_pos(&format!("{current},{io}"));
        f.conn = Some(c);
    }
    f
}

/// Applies everything the replica received, then makes it the primary.
async fn make_primary(c: &mut Conn, wait: Duration) -> anyhow::Result<()> {
    c.query_drop("STOP SLAVE IO_THREAD").await?;
    let slave: Option<Row> = c.query_first("SHOW SLAVE STATUS").await?;
    let received = slave
        .and_then(|r| r.get_opt::<String, _>("Gtid_IO_Pos"))
        .and_then(Result::ok)
        .unwrap_or_default();
    if !received.is_empty() {
        let applied: Option<i64> = c
            .exec_first(
                "SELECT MASTER_GTID_WAIT(?, ?)",
                (&received, wait.as_secs_f64()),
            )
            .await?;
        anyhow::ensure!(
            applied == Some(0),
            "the replica did not apply its relay log (up to {received}) within {wait:?}"
        );
    }
    c.query_drop(
        "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL rpl_semi_sync_master_enabled = ON; \
         SET GLOBAL read_only = OFF",
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_positions_parse_and_compare() {
        let p = parse_gtid_pos("0-1-100, 1-2-5,0-2-90,");
        assert_eq!(p, GtidPos::from([(0, 100), (1, 5)]));
        let a = parse_gtid_pos("0-1-100");
        let b = parse_gtid_pos("0-1-120");
        let c = parse_gtid_pos("0-1-110,1-3-1");
        assert_eq!(most_advanced(&[a.clone(), b.clone()]), Some(1));
        assert_eq!(most_advanced(&[b.clone(), a.clone()]), Some(0));
        assert_eq!(most_advanced(&[a.clone(), a.clone()]), Some(0));
        // b is ahead in domain 0, c in domain 1: diverged.
        assert_eq!(most_advanced(&[b, c]), None);
        assert_eq!(most_advanced(&[GtidPos::new(), a]), Some(1));
    }
}
