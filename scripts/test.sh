#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (MariaDB,
# mariadb-backup, openssl, tshark,
# iproute2, python3-venv, prometheus (promtool), prometheus-alertmanager
# (amtool); schemathesis into .state/venv) when missing and we are root,
# brings up the private MariaDB,
# checks formatting and lints, then runs every test of the workspace.
set -euo pipefail
CASD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$CASD_ROOT"
# shellcheck source=scripts/mariadb.sh
. scripts/mariadb.sh

need=()
command -v tshark >/dev/null 2>&1 || need+=(tshark)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# tests/it/db_*.rs: hot backup/restore, the MariaDB TLS certificates.
command -v mariadb-backup >/dev/null 2>&1 || need+=(mariadb-backup)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# tests/it/alerting.rs: promtool, prometheus, amtool, the alertmanager;
# tests/it/metrics.rs: promtool (`promtool check metrics`).
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need+=(prometheus)
{ command -v prometheus-alertmanager && command -v amtool; } >/dev/null 2>&1 || need+=(prometheus-alertmanager)
# python3 with venv/ensurepip, for schemathesis below.
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    casd_die "tests need: ${need[*]} (sudo apt-get install ${need[*]})"
  fi
fi
casd_mariadb_up

# schemathesis (PyPI) for tests/it/openapi.rs, pinned, in a venv under .state/
# (Debian's pip refuses system-wide installs, PEP 668). The test fails
# without it unless CASD_TEST_SKIP_SCHEMATHESIS=1.
SCHEMATHESIS_VERSION=4.32.5
venv=.state/venv
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
  echo "installing schemathesis $SCHEMATHESIS_VERSION into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" || casd_die "cannot create a Python venv in $venv (apt-get install python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" \
    || casd_die "cannot install schemathesis $SCHEMATHESIS_VERSION from PyPI into $venv"
fi

# Databases left behind by killed test runs.
if [ -n "${CASD_DB_DIR:-}" ]; then
  for d in $(casd_db_sql "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE 'casd\\_t\\_%'"); do
    casd_db_sql "DROP DATABASE \`$d\`" || true
  done
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace "$@"
