-- Scheduler (issue 7): runs asked for by an operator, job progress, and the
-- indexes the purge needs. Statements are idempotent.

-- A run asked for now (`casd jobs run NAME`, POST /jobs/NAME/run). The
-- instance that next runs the job takes every pending trigger of it
-- (run_id = the job_runs row) in the run's first, fenced transaction.
CREATE TABLE IF NOT EXISTS job_triggers (
  id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  job            VARCHAR(64)     NOT NULL,
  params         TEXT            NULL,               -- JSON object, job-specific
  requested_by   VARCHAR(128)    NOT NULL,
  requested_at   DATETIME(6)     NOT NULL,
  run_id         BIGINT UNSIGNED NULL,
  PRIMARY KEY (id),
  KEY ix_job_triggers_pending (job, run_id)
) ENGINE=InnoDB;

-- Progress a job keeps across runs (e.g. the rotation's enqueue cursor),
-- written in the same fenced transaction as the work it describes.
CREATE TABLE IF NOT EXISTS scheduler_state (
  name           VARCHAR(64)     NOT NULL,
  value          TEXT            NOT NULL,           -- JSON
  updated_at     DATETIME(6)     NOT NULL,
  PRIMARY KEY (name)
) ENGINE=InnoDB;

-- Purge of withdrawn EMMs past retention, without scanning every live one.
CREATE INDEX IF NOT EXISTS ix_emms_state_created ON emms (state, created_at);
-- Purge of old job runs.
CREATE INDEX IF NOT EXISTS ix_job_runs_started ON job_runs (started_at);
