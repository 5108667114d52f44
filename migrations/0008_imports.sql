-- Personalization exports and device imports (issue 21). Idempotent.

-- Every personalization export (`casd keys export`, POST /encryptor/v1/export):
-- who, when, which devices. Written by src/export.rs only, before the
-- wrapped keys leave the Encryptor: an export that could not be recorded
-- is not handed out.
CREATE TABLE IF NOT EXISTS duk_exports (
  id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  exported_by      VARCHAR(128)    NOT NULL,           -- OS user (CLI) or OAuth client id (API)
  via              ENUM('cli','api') NOT NULL,
  exported_at      DATETIME(6)     NOT NULL,
  pmk_version      INT UNSIGNED    NOT NULL,
  transport_key_id CHAR(16)        NOT NULL,           -- fingerprint of the vendor transport key
  device_count     BIGINT UNSIGNED NOT NULL,
  devices          MEDIUMTEXT      NOT NULL,           -- the devices as ranges, e.g. "1-1000,5000"
  PRIMARY KEY (id),
  KEY ix_duk_exports_at (exported_at)
) ENGINE=InnoDB;
