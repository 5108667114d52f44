-- casd schema v1. Applied by `casd migrate` (and at start-up) in file order,
-- each file recorded in schema_migrations. Statements are idempotent
-- (IF NOT EXISTS) so a file interrupted half-way can be re-applied.
-- All times are UTC. Binary keys/ids are big-endian as on the wire.

-- Every request the SMS sent, accepted or refused (sms-api.md "Records").
CREATE TABLE IF NOT EXISTS sms_requests (
  id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  sender         VARCHAR(128)    NOT NULL,           -- authenticated client id
  transaction_id VARCHAR(64)     NULL,               -- NULL when the body had none we could read
  path           VARCHAR(64)     NOT NULL,
  message        MEDIUMTEXT      NOT NULL,           -- the request body as received (lossy UTF-8)
  received_at    DATETIME(6)     NOT NULL,
  processed_at   DATETIME(6)     NULL,               -- when every EMM for it was stored
  status_code    SMALLINT UNSIGNED NOT NULL,
  response       MEDIUMTEXT      NOT NULL,           -- reply body sent
  PRIMARY KEY (id),
  KEY ix_sms_requests_txn (sender, transaction_id),
  KEY ix_sms_requests_received (received_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

-- Idempotency on (sender, transaction_id) for accepted commands only: a
-- refused request changed nothing, so its transaction_id stays free.
CREATE TABLE IF NOT EXISTS idempotency (
  sender         VARCHAR(128)    NOT NULL,
  transaction_id VARCHAR(64)     NOT NULL,
  body_sha256    BINARY(32)      NOT NULL,           -- of the canonical parsed command
  request_id     BIGINT UNSIGNED NOT NULL,
  created_at     DATETIME(6)     NOT NULL,
  PRIMARY KEY (sender, transaction_id),
  KEY ix_idempotency_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS devices (
  device_id      BIGINT UNSIGNED NOT NULL,           -- 1 ..= 2^53-1
  state          ENUM('enabled','disabled') NOT NULL,
  group_id       INT UNSIGNED    NULL,               -- NULL while disabled (slot freed)
  slot           TINYINT UNSIGNED NULL,
  pmk_version    INT UNSIGNED    NOT NULL,           -- PMK version its DUK derives from
  created_at     DATETIME(6)     NOT NULL,
  updated_at     DATETIME(6)     NOT NULL,
  PRIMARY KEY (device_id),
  UNIQUE KEY uq_devices_slot (group_id, slot),
  KEY ix_devices_state (state, device_id)
) ENGINE=InnoDB;

-- Group slots: every group has 256 rows once created; device_id NULL = free.
-- Allocation takes the lowest free (group_id, slot), so groups fill in order
-- and freed slots are reused (docs/format.md §1).
CREATE TABLE IF NOT EXISTS group_slots (
  group_id       INT UNSIGNED    NOT NULL,           -- >= 1
  slot           TINYINT UNSIGNED NOT NULL,
  device_id      BIGINT UNSIGNED NULL,
  PRIMARY KEY (group_id, slot),
  UNIQUE KEY uq_group_slots_device (device_id),
  KEY ix_group_slots_free (device_id, group_id, slot)
) ENGINE=InnoDB;

-- One row per (device, product); re-adding replaces the window.
CREATE TABLE IF NOT EXISTS entitlements (
  device_id      BIGINT UNSIGNED NOT NULL,
  product_id     INT UNSIGNED    NOT NULL,
  start_at       INT UNSIGNED    NOT NULL,           -- unix seconds, as on the wire
  end_at         INT UNSIGNED    NOT NULL,
  state          ENUM('active','ended') NOT NULL,
  updated_at     DATETIME(6)     NOT NULL,
  ended_at       DATETIME(6)     NULL,
  PRIMARY KEY (device_id, product_id),
  KEY ix_entitlements_ended (state, ended_at)
) ENGINE=InnoDB;

-- emm_id source: a sequence, so the id is known before sealing (it is inside
-- the plaintext and the section header). Gaps (rollbacks) are allowed.
CREATE SEQUENCE IF NOT EXISTS emm_id_seq START WITH 1 INCREMENT BY 1 CACHE 1000;

CREATE TABLE IF NOT EXISTS emms (
  id             BIGINT UNSIGNED NOT NULL,           -- emm_id
  request_id     BIGINT UNSIGNED NULL,               -- sms_requests.id, NULL for scheduler-made EMMs
  addressing     ENUM('unique','group','global') NOT NULL,
  address        BIGINT UNSIGNED NOT NULL,           -- device_id / group_id / 0
  key_version    INT UNSIGNED    NOT NULL,
  class          TINYINT UNSIGNED NOT NULL,          -- 0 urgent, 1 change, 2 background
  purpose        VARCHAR(64)     NOT NULL,           -- what it carries, for supersession (e.g. 'entitlement_set')
  emm_data       TEXT            NOT NULL,           -- plaintext commands, reviewable JSON (never key bytes)
  encrypted_emm  VARBINARY(4096) NOT NULL,           -- the complete section, CRC included
  created_at     DATETIME(6)     NOT NULL,
  not_after      DATETIME(6)     NOT NULL,
  state          ENUM('live','withdrawn') NOT NULL,
  PRIMARY KEY (id),
  KEY ix_emms_state_id (state, id),
  KEY ix_emms_not_after (not_after),
  KEY ix_emms_address (addressing, address, purpose, state),
  KEY ix_emms_request (request_id)
) ENGINE=InnoDB;

-- Change feed for the Cycler: one row per EMM added to / removed from the
-- carousel, written in the same transaction as the change.
CREATE TABLE IF NOT EXISTS carousel_events (
  id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  emm_id         BIGINT UNSIGNED NOT NULL,
  op             ENUM('add','remove') NOT NULL,
  created_at     DATETIME(6)     NOT NULL,
  PRIMARY KEY (id),
  KEY ix_carousel_events_created (created_at)
) ENGINE=InnoDB;

-- Key material, sealed under the root key (docs/format.md §4):
-- sealed = envelope with table_id 0x00, address = id (u64).
CREATE TABLE IF NOT EXISTS `keys` (
  id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  kind           ENUM('pmk','group','global') NOT NULL,
  group_id       INT UNSIGNED    NOT NULL DEFAULT 0, -- 0 unless kind = 'group'
  version        INT UNSIGNED    NOT NULL,
  sealed         VARBINARY(256)  NOT NULL,
  root_key_id    BINARY(8)       NOT NULL,           -- fingerprint of the root key that sealed it
  state          ENUM('pending','active','retiring','retired') NOT NULL,
  created_at     DATETIME(6)     NOT NULL,
  activates_at   DATETIME(6)     NOT NULL,
  retires_at     DATETIME(6)     NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uq_keys_version (kind, group_id, version),
  KEY ix_keys_state (kind, state, group_id)
) ENGINE=InnoDB;

-- The outbox between the SMS-CAS interface and the EMMG. Workers take items
-- with SELECT ... FOR UPDATE SKIP LOCKED; items of one device are processed
-- in id order (the worker checks for an earlier pending item of its device).
CREATE TABLE IF NOT EXISTS work_items (
  id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  request_id     BIGINT UNSIGNED NULL,
  kind           VARCHAR(32)     NOT NULL,
  device_id      BIGINT UNSIGNED NULL,
  payload        TEXT            NOT NULL,           -- JSON of the validated command
  state          ENUM('pending','done','failed') NOT NULL,
  attempts       INT UNSIGNED    NOT NULL DEFAULT 0,
  not_before     DATETIME(6)     NOT NULL,
  last_error     VARCHAR(1024)   NULL,
  created_at     DATETIME(6)     NOT NULL,
  done_at        DATETIME(6)     NULL,
  PRIMARY KEY (id),
  KEY ix_work_items_pending (state, not_before, id),
  KEY ix_work_items_device (device_id, state, id),
  KEY ix_work_items_done (state, done_at)
) ENGINE=InnoDB;

-- Single-instance jobs (Scheduler): a lease with expiry and a fencing token
-- that grows on every take-over.
CREATE TABLE IF NOT EXISTS leases (
  name           VARCHAR(64)     NOT NULL,
  holder         VARCHAR(128)    NOT NULL,
  fence          BIGINT UNSIGNED NOT NULL,
  expires_at     DATETIME(6)     NOT NULL,
  PRIMARY KEY (name)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS job_runs (
  id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  job            VARCHAR(64)     NOT NULL,
  holder         VARCHAR(128)    NOT NULL,
  fence          BIGINT UNSIGNED NOT NULL,
  started_at     DATETIME(6)     NOT NULL,
  ended_at       DATETIME(6)     NULL,
  outcome        VARCHAR(16)     NULL,               -- ok / error / fenced
  counts         TEXT            NULL,               -- JSON
  PRIMARY KEY (id),
  KEY ix_job_runs_job (job, started_at)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS oauth_clients (
  client_id      VARCHAR(64)     NOT NULL,
  secret_hash    VARCHAR(255)    NOT NULL,           -- Argon2id PHC string, never the secret
  scopes         VARCHAR(255)    NOT NULL,           -- space-separated
  enabled        BOOL            NOT NULL,
  rate_per_s     INT UNSIGNED    NOT NULL DEFAULT 100,
  created_at     DATETIME(6)     NOT NULL,
  updated_at     DATETIME(6)     NOT NULL,
  PRIMARY KEY (client_id)
) ENGINE=InnoDB;
