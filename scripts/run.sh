#!/usr/bin/env bash
# Runs the headend with every role: brings up a private MariaDB when no
# database is configured (with --replicated: a primary + semi-synchronous
# replica pair, see docs/operations.md), builds casd, creates a local configuration and the
# root key on first use, migrates, and starts. Ctrl-C stops it gracefully.
set -euo pipefail
CASD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$CASD_ROOT"
# shellcheck source=scripts/mariadb.sh
. scripts/mariadb.sh
if [ "${1:-}" = --replicated ]; then
  shift
  casd_mariadb_group_up
else
  casd_mariadb_up
fi

cargo build --release --bin casd
CASD=target/release/casd

# A local configuration on first run: the example with local paths. The
# database URL comes from the environment, never written into the file.
CONF="${CASD_CONFIG:-$CASD_STATE_DIR/casd.toml}"
# The local MariaDB's CA (scripts/mariadb.sh) is the one casd verifies.
ca_sed=()
[ -n "${CASD_DB_DIR:-}" ] && ca_sed=(-e "s|^# tls_ca = .*|tls_ca = \"$CASD_TEST_DATABASE_CA\"|")
if [ ! -f "$CONF" ]; then
  sed -e "s|^url = .*|url = \"mysql://set-by-environment@127.0.0.1/casd\"|" \
      -e "s|^request_log = .*|request_log = \"$CASD_STATE_DIR/log/requests.jsonl\"|" \
      -e "s|^log_file = .*|log_file = \"$CASD_STATE_DIR/log/carousel.jsonl\"|" \
      -e "s|^root_key_file = .*|root_key_file = \"$CASD_STATE_DIR/keys/root.key\"|" \
      -e "s|^signing_key_file = .*|signing_key_file = \"$CASD_STATE_DIR/keys/token-signing.pem\"|" \
      "${ca_sed[@]}" casd.example.toml >"$CONF"
  echo "casd: wrote $CONF" >&2
elif [ -n "${CASD_DB_DIR:-}" ] && ! grep -Eq '^tls(_ca)? *=' "$CONF"; then
  # A configuration from before TLS to the database: the local server's CA.
  echo "casd: NOTE: $CONF has no database.tls_ca; using the local MariaDB's CA $CASD_TEST_DATABASE_CA" >&2
  export CASD_DATABASE__TLS_CA="$CASD_TEST_DATABASE_CA"
fi
export CASD_CONFIG="$CONF"
mkdir -p "$CASD_STATE_DIR/log" "$CASD_STATE_DIR/keys"
chmod 700 "$CASD_STATE_DIR/keys"

"$CASD" config check
"$CASD" migrate
"$CASD" keys init --if-missing
"$CASD" auth init-key
# A first OAuth client for the SMS, created once; its secret is kept in a
# 0600 file (only its hash is in the database).
if [ ! -s "$CASD_STATE_DIR/sms-client.env" ]; then
  (umask 077; "$CASD" clients create --id sms --scopes sms:write,sms:read >"$CASD_STATE_DIR/sms-client.env")
  echo "casd: created OAuth client 'sms'; its credentials are in $CASD_STATE_DIR/sms-client.env" >&2
fi
echo "casd: get a token with: curl -u \"sms:\$(sed -n 's/^client_secret=//p' $CASD_STATE_DIR/sms-client.env)\" -d grant_type=client_credentials http://127.0.0.1:8080/oauth/token" >&2
exec "$CASD" run "$@"
