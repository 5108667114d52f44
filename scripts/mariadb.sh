# shellcheck shell=bash
# Sourced by scripts/run.sh and scripts/test.sh: makes sure a MariaDB is
# there for casd and exports its URLs.
#
# - CASD_DATABASE_URL already set: that database is used as it is.
# - Otherwise a private MariaDB is brought up under $CASD_STATE_DIR/mariadb
#   (own data directory, socket, port and password; never the system's
#   /var/lib/mysql), installing Debian's mariadb-server first if it is
#   missing and we are root. A second run reuses the running instance, or
#   restarts it on the same data.
#
# Exports: CASD_DATABASE_URL (database `casd`) and CASD_TEST_DATABASE_URL
# (server only; tests create one database each).

casd_die() { echo "casd: $*" >&2; exit 1; }

casd_find_mariadbd() {
  for b in mariadbd mysqld /usr/sbin/mariadbd /usr/sbin/mysqld; do
    if command -v "$b" >/dev/null 2>&1; then command -v "$b"; return 0; fi
  done
  return 1
}

casd_install_mariadb() {
  if casd_find_mariadbd >/dev/null; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    casd_die "MariaDB is not installed. Install it (sudo apt-get install mariadb-server) or set CASD_DATABASE_URL."
  fi
  echo "casd: installing mariadb-server (Debian package)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || casd_die "apt-get update failed"
  # policy-rc.d may forbid starting the system service; we never use it anyway.
  apt-get install -y -qq mariadb-server mariadb-client >/dev/null || casd_die "apt-get install mariadb-server failed"
  casd_find_mariadbd >/dev/null || casd_die "mariadb-server installed but mariadbd not found"
}

casd_db_ping() {
  mariadb-admin --no-defaults --socket="$CASD_DB_DIR/mysqld.sock" -u"$(id -un)" ping >/dev/null 2>&1
}

casd_db_sql() {
  mariadb --no-defaults --socket="$CASD_DB_DIR/mysqld.sock" -u"$(id -un)" -N -B -e "$1"
}

casd_mariadb_up() {
  : "${CASD_STATE_DIR:=$CASD_ROOT/.state}"
  export CASD_STATE_DIR
  if [ -n "${CASD_DATABASE_URL:-}" ]; then
    : "${CASD_TEST_DATABASE_URL:=${CASD_DATABASE_URL%/*}}"
    export CASD_TEST_DATABASE_URL
    echo "casd: using the configured database (CASD_DATABASE_URL)" >&2
    return 0
  fi
  casd_install_mariadb
  CASD_DB_DIR="$CASD_STATE_DIR/mariadb"
  mkdir -p "$CASD_DB_DIR"
  chmod 700 "$CASD_STATE_DIR" "$CASD_DB_DIR"
  local mariadbd; mariadbd=$(casd_find_mariadbd)
  local userarg=()
  [ "$(id -u)" = 0 ] && userarg=(--user=root)

  if [ ! -d "$CASD_DB_DIR/data/mysql" ]; then
    echo "casd: initialising a private MariaDB in $CASD_DB_DIR" >&2
    rm -rf "$CASD_DB_DIR/data"
    mariadb-install-db --no-defaults --datadir="$CASD_DB_DIR/data" "${userarg[@]}" \
      --auth-root-authentication-method=socket --skip-test-db >"$CASD_DB_DIR/install.log" 2>&1 \
      || { cat "$CASD_DB_DIR/install.log" >&2; casd_die "mariadb-install-db failed"; }
  fi
  if [ ! -f "$CASD_DB_DIR/port" ]; then
    # A free port in a private range, fixed for this state directory.
    local p
    for p in $(seq 33306 33406); do
      if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p" >"$CASD_DB_DIR/port"; break; fi
    done
  fi
  CASD_DB_PORT=$(cat "$CASD_DB_DIR/port")

  if ! casd_db_ping; then
    rm -f "$CASD_DB_DIR/mysqld.sock" "$CASD_DB_DIR/mysqld.pid"
    echo "casd: starting MariaDB on 127.0.0.1:$CASD_DB_PORT" >&2
    # setsid: the server outlives this script (a second run reuses it).
    setsid "$mariadbd" --no-defaults --datadir="$CASD_DB_DIR/data" "${userarg[@]}" \
      --socket="$CASD_DB_DIR/mysqld.sock" --port="$CASD_DB_PORT" --bind-address=127.0.0.1 \
      --pid-file="$CASD_DB_DIR/mysqld.pid" --log-error="$CASD_DB_DIR/error.log" \
      --skip-name-resolve --max-connections=1000 --innodb-buffer-pool-size=256M \
      --innodb-flush-log-at-trx-commit=1 --innodb-lock-wait-timeout=10 \
      --character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci \
      </dev/null >/dev/null 2>&1 &
    local i
    for i in $(seq 1 300); do
      casd_db_ping && break
      sleep 0.1
    done
    casd_db_ping || { tail -20 "$CASD_DB_DIR/error.log" >&2; casd_die "MariaDB did not start (log: $CASD_DB_DIR/error.log)"; }
  fi

  if [ ! -s "$CASD_DB_DIR/casd.password" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$CASD_DB_DIR/casd.password")
  fi
  local pw; pw=$(cat "$CASD_DB_DIR/casd.password")
  # The casd user may create databases: tests make one each.
  casd_db_sql "CREATE USER IF NOT EXISTS 'casd'@'127.0.0.1' IDENTIFIED BY '$pw';
    ALTER USER 'casd'@'127.0.0.1' IDENTIFIED BY '$pw';
    GRANT ALL PRIVILEGES ON *.* TO 'casd'@'127.0.0.1';
    CREATE DATABASE IF NOT EXISTS casd CHARACTER SET utf8mb4;" \
    || casd_die "cannot create the casd user and database"

  export CASD_DATABASE_URL="mysql://casd:$pw@127.0.0.1:$CASD_DB_PORT/casd"
  export CASD_TEST_DATABASE_URL="mysql://casd:$pw@127.0.0.1:$CASD_DB_PORT"
  (umask 077; echo "$CASD_TEST_DATABASE_URL" >"$CASD_STATE_DIR/test-database-url")
}
