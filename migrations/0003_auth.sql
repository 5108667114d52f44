-- Token signing keys (docs/security.md "Keys"). Only PUBLIC keys are stored
-- here: every role instance verifies access tokens against this set. The
-- private key of each issuing process stays in its own 0600 key file.
-- retires_at NULL: the key may sign and verify; set: it no longer signs and
-- verifies only until that time (previous key kept for tokens in flight).
CREATE TABLE IF NOT EXISTS jwt_keys (
  kid            VARCHAR(64)     NOT NULL,           -- RFC 7638 JWK thumbprint (base64url SHA-256)
  alg            VARCHAR(16)     NOT NULL,           -- 'EdDSA' (Ed25519)
  public_key     VARBINARY(64)   NOT NULL,           -- raw Ed25519 public key, 32 bytes
  created_at     DATETIME(6)     NOT NULL,
  retires_at     DATETIME(6)     NULL,
  PRIMARY KEY (kid),
  KEY ix_jwt_keys_retires (retires_at)
) ENGINE=InnoDB;
