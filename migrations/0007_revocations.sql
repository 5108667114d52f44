-- Revocations (issue 21). Idempotent.
--
-- One row per removed device that held a group slot, written by the EMMG
-- in the transaction that makes the removal's EMMs (so exactly once): its
-- group's GK was rotated then and the new version sent to the remaining
-- members only. The `revocation` job rotates the GLK once
-- `scheduler.glk_rotation_removals` rows have no glk_version yet and
-- stamps them with the GLK version that excludes them. Rows are state,
-- not a cursor: one committed late is still counted.
CREATE TABLE IF NOT EXISTS revocations (
  id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  device_id      BIGINT UNSIGNED NOT NULL,
  group_id       INT UNSIGNED    NOT NULL,
  gk_version     INT UNSIGNED    NOT NULL,           -- the group's GK made at the removal
  glk_version    INT UNSIGNED    NULL,               -- the GLK rotated for it; NULL: not yet
  created_at     DATETIME(6)     NOT NULL,
  PRIMARY KEY (id),
  KEY ix_revocations_pending (glk_version, id)
) ENGINE=InnoDB;
