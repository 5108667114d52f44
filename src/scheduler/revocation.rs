//! Revocation that holds (docs/scheduler.md, "Revocation"): the only
//! module that names the `revocations` table.
//!
//! - **GK, at the removal.** The EMMG, making a removed device's EMMs,
//!   has the Encryptor create its group's next GK active at once and sends
//!   it (with the global keys) to each remaining member in a unique EMM;
//!   in the same transaction it records the removal here
//!   ([`push_revoked`]). Group EMMs sealed from then on are under a key the
//!   removed device never received.
//! - **GLK, after `scheduler.glk_rotation_removals` removals** (the
//!   `revocation` job): when that many rows have no `glk_version` yet, a
//!   new GLK active at once goes out group-addressed — one group EMM per
//!   group with members, sealed under the group's GK in force (for a
//!   revoked group the new one) — and the rows are stamped with it in the
//!   same fenced transaction as the enqueue. Rows are state, not a cursor,
//!   so a removal committed late is still counted. A run that dies after
//!   creating the GLK leaves an unused version; the next run makes another.

use mysql_async::prelude::*;
use mysql_async::Value;

use super::rotation::{group_key_items, groups_with_members_after, KEYS_LIVE_AFTER_ACTIVATION_S};
use super::{db_now, Counts, Job, JobCtx, JobError};
use crate::encryptor::BoxFuture;
use crate::keystore::KeyKind;
use crate::queue::{self, At, KeyOffer};
use crate::sqltext::{marks, Script};

/// A removed device's group rekeyed (one `revocations` row).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Revoked {
    pub device_id: u64,
    pub group_id: u32,
    /// The group's GK version made at the removal.
    pub gk_version: u32,
}

/// The rows of a batch's removals, one statement of the EMMG's write
/// script (so recorded exactly once, with the removal's EMMs).
pub fn push_revoked(w: &mut Script, revoked: &[Revoked]) -> Result<(), crate::sqltext::Error> {
    if revoked.is_empty() {
        return Ok(());
    }
    let vals: Vec<Value> = revoked
        .iter()
        .flat_map(|r| [r.device_id.into(), r.group_id.into(), r.gk_version.into()])
        .collect();
    w.push(
        &format!(
            "INSERT INTO revocations (device_id, group_id, gk_version, created_at) VALUES {}",
            marks(revoked.len(), "(?, ?, ?, UTC_TIMESTAMP(6))")
        ),
        &vals,
    )?;
    Ok(())
}

/// Removals not yet excluded from the GLK: (count, highest id).
pub async fn pending<Q: Queryable>(q: &mut Q) -> Result<(u64, u64), mysql_async::Error> {
    let r: Option<(u64, Option<u64>)> = q
        .query_first("SELECT COUNT(*), MAX(id) FROM revocations WHERE glk_version IS NULL")
        .await?;
    Ok(r.map_or((0, 0), |(n, id)| (n, id.unwrap_or(0))))
}

pub struct RevocationJob;

impl Job for RevocationJob {
    fn name(&self) -> &str {
        "revocation"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Counts, JobError>> {
        Box::pin(revoke(ctx))
    }
}

/// Whether a GLK rotation is due: `threshold` (0 = never by count)
/// removals not yet excluded from it.
fn due(pending: u64, threshold: u32) -> bool {
    threshold > 0 && pending >= u64::from(threshold)
}

/// One `revocation` run.
async fn revoke(ctx: &JobCtx) -> Result<Counts, JobError> {
    let mut counts = Counts::new();
    let mut c = ctx.conn().await?;
    let (n, last) = pending(&mut c).await?;
    counts.insert("removals_pending".into(), n.into());
    if !due(n, ctx.shared.cfg.scheduler.glk_rotation_removals) {
        return Ok(counts);
    }
    ctx.check()?;
    let glk = ctx
        .encryptor()?
        .create_key_version(KeyKind::Global, 0)
        .await?;
    tracing::warn!(
        version = glk.version,
        removals = n,
        "GLK rotated for removed devices"
    );
    let offer = KeyOffer {
        version: glk.version,
        activates_at: glk.activates_at,
    };
    let not_after = db_now(&mut c)
        .await?
        .max(glk.activates_at)
        .saturating_add(KEYS_LIVE_AFTER_ACTIVATION_S);
    let mut tx = ctx.begin(&mut c).await?;
    let groups = groups_with_members_after(&mut tx, 0, u64::MAX).await?;
    let works = group_key_items(&groups, |_| None, Some(offer), not_after);
    let items: Vec<queue::NewItem<'_>> = works
        .iter()
        .map(|w| queue::NewItem {
            request_id: None,
            work: w,
            not_before: At::ServerNow,
        })
        .collect();
    let mut enqueued = 0;
    // One statement per thousand (a statement's placeholders are bounded).
    for chunk in items.chunks(1000) {
        enqueued += queue::enqueue(&mut tx, chunk).await?;
    }
    tx.exec_drop(
        "UPDATE revocations SET glk_version = ? WHERE glk_version IS NULL AND id <= ?",
        (glk.version, last),
    )
    .await?;
    tx.commit().await?;
    ctx.shared.work_ready.notify_one();
    counts.insert("glk_version".into(), glk.version.into());
    counts.insert("delivergroupkeys_enqueued".into(), enqueued.into());
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_glk_rotates_after_the_configured_removals() {
        assert!(!due(0, 1));
        assert!(due(1, 1));
        assert!(!due(2, 3));
        assert!(due(3, 3));
        // 0: only on schedule.
        assert!(!due(1_000, 0));
    }

    #[test]
    fn removals_are_one_statement() {
        let mut w = Script::default();
        push_revoked(&mut w, &[]).unwrap();
        let r = Revoked {
            device_id: 7,
            group_id: 2,
            gk_version: 3,
        };
        push_revoked(&mut w, &[r, r]).unwrap();
        // The next statement is the script's second: nothing for no
        // removal, one INSERT for two.
        assert_eq!(w.push("SELECT 1", &[]).unwrap(), 1);
    }
}
