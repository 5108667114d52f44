#!/usr/bin/env bash
# Runs the headend with every role: brings up a private MariaDB when no
# database is configured, builds casd, creates a local configuration and the
# root key on first use, migrates, and starts. Ctrl-C stops it gracefully.
set -euo pipefail
CASD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$CASD_ROOT"
# shellcheck source=scripts/mariadb.sh
. scripts/mariadb.sh
casd_mariadb_up

cargo build --release --bin casd
CASD=target/release/casd

# A local configuration on first run: the example with local paths. The
# database URL comes from the environment, never written into the file.
CONF="${CASD_CONFIG:-$CASD_STATE_DIR/casd.toml}"
if [ ! -f "$CONF" ]; then
  sed -e "s|^url = .*|url = \"mysql://set-by-environment@127.0.0.1/casd\"|" \
      -e "s|^request_log = .*|request_log = \"$CASD_STATE_DIR/log/requests.jsonl\"|" \
      -e "s|^log_file = .*|log_file = \"$CASD_STATE_DIR/log/carousel.jsonl\"|" \
      -e "s|^root_key_file = .*|root_key_file = \"$CASD_STATE_DIR/keys/root.key\"|" \
      casd.example.toml >"$CONF"
  echo "casd: wrote $CONF" >&2
fi
export CASD_CONFIG="$CONF"
mkdir -p "$CASD_STATE_DIR/log" "$CASD_STATE_DIR/keys"
chmod 700 "$CASD_STATE_DIR/keys"

"$CASD" config check
"$CASD" migrate
if "$CASD" keys --help >/dev/null 2>&1; then
  "$CASD" keys init --if-missing
fi
exec "$CASD" run "$@"
