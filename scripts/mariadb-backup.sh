#!/usr/bin/env bash
# Hot backup and restore of a casd MariaDB instance (one made by
# scripts/mariadb.sh) with mariadb-backup: the headend keeps serving while
# the backup runs.
#
#   scripts/mariadb-backup.sh backup [INSTANCE_DIR] TARGET_DIR
#       Copies the running instance (default .state/mariadb) into TARGET_DIR
#       (must not exist) and prepares it (a consistent, crash-recovered copy).
#   scripts/mariadb-backup.sh restore TARGET_DIR NEW_INSTANCE_DIR PORT [SERVER_ID]
#       Makes a fresh instance from a prepared backup and starts it on PORT.
#       Its users (casd's included) and passwords are the backup's.
#
# Encryption: the backup holds the pages as they are on disk, encrypted
# with the instance's key file (NEW_INSTANCE_DIR/../mariadb-secrets/keyfile,
# outside every data directory). The key file is NOT in the backup: keep it
# apart (production: the KMS holds it). To restore, put that same key file
# at NEW_INSTANCE_DIR/../mariadb-secrets/keyfile (mode 0600) first; the
# restore checks it against the fingerprint the backup recorded and stops
# if it is missing or another one. docs/operations.md has the runbook.
set -euo pipefail
CASD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/mariadb.sh
. "$CASD_ROOT/scripts/mariadb.sh"

command -v mariadb-backup >/dev/null 2>&1 \
  || casd_die "mariadb-backup is not installed (apt-get install mariadb-backup)"

# SHA-256 of the key file: names which keys a backup needs, reveals nothing of them.
key_fingerprint() { sha256sum "$1" | cut -d' ' -f1; }

backup() {
  local inst target
  if [ $# -ge 2 ]; then inst=$1; target=$2; else inst="${CASD_STATE_DIR:-$CASD_ROOT/.state}/mariadb"; target=${1:?TARGET_DIR}; fi
  [ -f "$inst/my.cnf" ] || casd_die "$inst/my.cnf not found: not an instance of scripts/mariadb.sh"
  casd_mariadb_ping "$inst" || casd_die "the MariaDB in $inst is not running"
  [ -e "$target" ] && casd_die "$target exists: a backup goes into a new directory"
  (umask 077; mkdir -p "$target")
  echo "casd: backing up $inst into $target (the server keeps serving)" >&2
  mariadb-backup --defaults-file="$inst/my.cnf" --backup --target-dir="$target" \
    --user="$(id -un)" --socket="$inst/mysqld.sock" >"$target.log" 2>&1 \
    || { tail -20 "$target.log" >&2; casd_die "mariadb-backup --backup failed (log: $target.log)"; }
  # --prepare reads the key plugin's options that --backup recorded in
  # backup-my.cnf (the source's key file, readable here).
  mariadb-backup --defaults-file="$target/backup-my.cnf" --prepare --target-dir="$target" >>"$target.log" 2>&1 \
    || { tail -20 "$target.log" >&2; casd_die "mariadb-backup --prepare failed (log: $target.log)"; }
  key_fingerprint "$(casd_mariadb_secrets_dir "$inst")/keyfile" >"$target/casd-keyfile.sha256"
  echo "casd: backup ready in $target; it needs the key file $(casd_mariadb_secrets_dir "$inst")/keyfile to be restored" >&2
}

restore() {
  local target=${1:?TARGET_DIR} dir=${2:?NEW_INSTANCE_DIR} port=${3:?PORT} id=${4:-1}
  [ -s "$target/casd-keyfile.sha256" ] || casd_die "$target is not a prepared backup of scripts/mariadb-backup.sh"
  [ -e "$dir/data" ] && casd_die "$dir/data exists: a restore goes into a fresh instance"
  mkdir -p "$dir"; chmod 700 "$dir"
  local s; s=$(casd_mariadb_secrets_dir "$dir")
  [ -s "$s/keyfile" ] || casd_die "no key file at $s/keyfile: copy the backed-up instance's key file there (mode 0600) first"
  [ "$(key_fingerprint "$s/keyfile")" = "$(cat "$target/casd-keyfile.sha256")" ] \
    || casd_die "$s/keyfile is not the key file this backup was encrypted with"
  casd_mariadb_config "$dir" "$port" "$id"
  echo "casd: restoring $target into $dir" >&2
  mariadb-backup --defaults-file="$dir/my.cnf" --copy-back --target-dir="$target" >"$dir/restore.log" 2>&1 \
    || { tail -20 "$dir/restore.log" >&2; casd_die "mariadb-backup --copy-back failed (log: $dir/restore.log)"; }
  echo "file_key_management" >"$dir/encrypted-at-rest"
  echo "$port" >"$dir/port"
  casd_mariadb_start "$dir"
  echo "casd: restored instance serving on 127.0.0.1:$port (users and passwords: the backup's)" >&2
}

case "${1:-}" in
  backup) shift; backup "$@" ;;
  restore) shift; restore "$@" ;;
  *) casd_die "usage: $0 backup [INSTANCE_DIR] TARGET_DIR | restore TARGET_DIR NEW_INSTANCE_DIR PORT [SERVER_ID]" ;;
esac
