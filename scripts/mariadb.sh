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
# - Every instance is encrypted at rest (file_key_management, key file
#   outside the data directory) and serves TLS with a CA made here: see
#   casd_mariadb_options, the one place the server's options are written.
#   A data directory from older, unencrypted scripts is moved aside, loudly.
#
# Exports: CASD_DATABASE_URL (database `casd`) and CASD_TEST_DATABASE_URL
# (server only; tests create one database each) and, for the local server,
# CASD_TEST_DATABASE_CA: its CA ($CASD_STATE_DIR/mariadb-secrets/ca.pem),
# which casd verifies the server with (database.tls_ca).

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

# An instance's server, as the OS user running this (socket authentication).
casd_mariadb_ping() {
  mariadb-admin --no-defaults --socket="$1/mysqld.sock" -u"$(id -un)" ping >/dev/null 2>&1
}
casd_mariadb_sql() {
  mariadb --no-defaults --socket="$1/mysqld.sock" -u"$(id -un)" -N -B -e "$2"
}
casd_db_ping() { casd_mariadb_ping "$CASD_DB_DIR"; }
casd_db_sql() { casd_mariadb_sql "$CASD_DB_DIR" "$1"; }

# ---------------------------------------------------------------------------
# One MariaDB instance's options: the ONLY place they are written. The local
# server below, a replica (scripts' --replicated pair) and the private
# servers tests start (the `casd::testing` helpers) all use them, so every
# instance is encrypted at rest and serves TLS the same way.
#
# Layout, for an instance directory DIR:
#   DIR/data/                         data directory (binary and relay logs too)
#   DIR/my.cnf                        written by casd_mariadb_config
#   DIR/mysqld.sock, mysqld.pid, error.log
#   DIR/../mariadb-secrets/           shared by the instances that are siblings
#                                     of DIR (a primary and its replicas, a
#                                     restored copy), never inside a data dir:
#     keyfile                         file_key_management keys, mode 0600
#     ca.pem, ca-key.pem              the local CA (TLS), key mode 0600
#     server-cert.pem, server-key.pem 127.0.0.1/localhost, signed by ca.pem
#
# casd_mariadb_options DIR PORT SERVER_ID prints the server's options, one
# `--name=value` a line (creating the secrets first when missing): pass
# them as words (`$(casd_mariadb_options ...)`; paths without blanks), or
# as an option file: casd_mariadb_config DIR PORT SERVER_ID writes DIR/my.cnf
# for `mariadbd --defaults-file=DIR/my.cnf` (mariadb-install-db and
# mariadb-backup take the same file: both need the key plugin to read and
# write encrypted pages). Options given after them win (e.g. a replica's).
# ---------------------------------------------------------------------------

casd_mariadb_secrets_dir() { echo "$(cd "$(dirname "$1")" && pwd)/mariadb-secrets"; }

# The at-rest keys: file_key_management's format, "id;hex key" per line
# (AES-256). Created once; never inside a data directory.
casd_mariadb_keyfile() {
  local s="$1"
  [ -s "$s/keyfile" ] && return 0
  echo "casd: creating the MariaDB at-rest key file $s/keyfile (mode 0600)" >&2
  (umask 077; echo "1;$(openssl rand -hex 32)" >"$s/keyfile.tmp" && mv "$s/keyfile.tmp" "$s/keyfile") \
    || casd_die "cannot write $s/keyfile"
}

# A local CA and one server certificate for 127.0.0.1 and localhost, shared
# by the local instances (casd verifies the server against ca.pem; replicas
# verify their primary with MASTER_SSL_CA, see casd_mariadb_master_ssl).
casd_mariadb_certs() {
  local s="$1"
  [ -s "$s/server-cert.pem" ] && [ -s "$s/server-key.pem" ] && [ -s "$s/ca.pem" ] && return 0
  command -v openssl >/dev/null 2>&1 || casd_die "openssl is needed for the MariaDB TLS certificates (apt-get install openssl)"
  echo "casd: creating the local MariaDB CA and server certificate in $s" >&2
  (
    umask 077
    set -e
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
      -subj "/CN=casd local MariaDB CA" -keyout "$s/ca-key.pem" -out "$s/ca.pem"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -subj "/CN=localhost" -keyout "$s/server-key.pem" -out "$s/server.csr"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n' >"$s/server.ext"
    openssl x509 -req -in "$s/server.csr" -CA "$s/ca.pem" -CAkey "$s/ca-key.pem" \
      -CAcreateserial -days 3650 -extfile "$s/server.ext" -out "$s/server-cert.pem"
    rm -f "$s/server.csr" "$s/server.ext" "$s/ca.srl"
    chmod 644 "$s/ca.pem" "$s/server-cert.pem"
  ) >/dev/null 2>&1 || casd_die "openssl failed to create the MariaDB certificates in $s"
}

casd_mariadb_options() {
  local dir="$1" port="$2" server_id="$3"
  [ -n "$dir" ] && [ -n "$port" ] && [ -n "$server_id" ] \
    || casd_die "usage: casd_mariadb_options DIR PORT SERVER_ID"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  # A temporary directory of its own: in the shared /tmp, two servers'
  # temporary files can collide by name (#sql-temptable-<pid>-…: the same
  # pid in two PID namespaces), and one server deleted another's during
  # mariadb-install-db ("Error on delete of '/tmp/#sql-temptable-…'").
  (umask 077; mkdir -p "$dir/tmp")
  local s; s=$(casd_mariadb_secrets_dir "$dir")
  (umask 077; mkdir -p "$s"); chmod 700 "$s"
  casd_mariadb_keyfile "$s"
  casd_mariadb_certs "$s"
  [ "$(id -u)" = 0 ] && echo "--user=root"
  # Binary log (replication, point-in-time recovery) with GTIDs; relay log.
  # Encryption at rest: every table (FORCE: none can be created
  # unencrypted), the redo log, temporary tables and files, binary and
  # relay logs, Aria tables; the keys in a file outside the data directory.
  # TLS for clients (casd: database.tls = "required") and replicas.
  printf -- '--%s\n' \
    "datadir=$dir/data" "socket=$dir/mysqld.sock" "port=$port" bind-address=127.0.0.1 \
    "pid-file=$dir/mysqld.pid" "log-error=$dir/error.log" "server-id=$server_id" \
    "tmpdir=$dir/tmp" \
    skip-name-resolve max-connections=1000 innodb-buffer-pool-size=256M \
    innodb-flush-log-at-trx-commit=1 innodb-lock-wait-timeout=10 \
    character-set-server=utf8mb4 collation-server=utf8mb4_general_ci \
    "log-bin=$dir/data/binlog" "relay-log=$dir/data/relay" binlog-format=ROW \
    log-slave-updates=ON gtid-strict-mode=ON \
    plugin-load-add=file_key_management "file-key-management-filename=$s/keyfile" \
    file-key-management-encryption-algorithm=AES_CTR \
    innodb-encrypt-tables=FORCE innodb-encrypt-log=ON innodb-encrypt-temporary-tables=ON \
    innodb-encryption-threads=2 encrypt-tmp-files=ON encrypt-tmp-disk-tables=ON \
    encrypt-binlog=ON aria-encrypt-tables=ON \
    "ssl-ca=$s/ca.pem" "ssl-cert=$s/server-cert.pem" "ssl-key=$s/server-key.pem" \
    tls-version=TLSv1.2,TLSv1.3
}

# Writes DIR/my.cnf ([mysqld], from casd_mariadb_options): mariadbd,
# mariadb-install-db and mariadb-backup take it as --defaults-file.
casd_mariadb_config() {
  local dir="$1" opts
  mkdir -p "$dir"
  opts=$(casd_mariadb_options "$@") || exit 1
  { echo "[mysqld]"; printf '%s\n' "$opts" | sed 's/^--//'; } >"$dir/my.cnf.tmp"
  mv "$dir/my.cnf.tmp" "$dir/my.cnf"
}

# The CHANGE MASTER TO options for a replica of an instance made by
# casd_mariadb_options: replication over TLS, the primary verified against
# the local CA (its certificate names 127.0.0.1). The replication user
# should be created with REQUIRE SSL.
casd_mariadb_master_ssl() {
  local s; s=$(casd_mariadb_secrets_dir "$1")
  echo "MASTER_SSL=1, MASTER_SSL_CA='$s/ca.pem', MASTER_SSL_VERIFY_SERVER_CERT=1"
}

# A fresh data directory for the instance in DIR (DIR/my.cnf written): the
# system tables are created with the same options, so they are encrypted
# from the first page.
casd_mariadb_install() {
  local dir="$1"
  echo "casd: initialising a private MariaDB in $dir (encrypted at rest)" >&2
  rm -rf "$dir/data"
  mariadb-install-db --defaults-file="$dir/my.cnf" \
    --auth-root-authentication-method=socket --skip-test-db >"$dir/install.log" 2>&1 \
    || { cat "$dir/install.log" >&2; casd_die "mariadb-install-db failed"; }
  echo "file_key_management" >"$dir/encrypted-at-rest"
}

# Starts mariadbd on DIR/my.cnf (then any further options given) and
# waits until it answers on its socket.
casd_mariadb_start() {
  local dir="$1" mariadbd; mariadbd=$(casd_find_mariadbd)
  shift
  rm -f "$dir/mysqld.sock" "$dir/mysqld.pid"
  # setsid: the server outlives this script (a second run reuses it).
  setsid "$mariadbd" --defaults-file="$dir/my.cnf" "$@" </dev/null >/dev/null 2>&1 &
  local i
  for i in $(seq 1 300); do
    casd_mariadb_ping "$dir" && return 0
    sleep 0.1
  done
  tail -20 "$dir/error.log" >&2
  casd_die "MariaDB did not start (log: $dir/error.log)"
}

# Data from before encryption at rest (an older casd's scripts): a running
# server without it is stopped, and its plain data directory is moved aside
# (never reused: its files, redo log and binary logs would stay readable).
casd_mariadb_retire_plain() {
  local dir="$1"
  if casd_mariadb_ping "$dir" && [ "$(casd_mariadb_sql "$dir" 'SELECT @@innodb_encrypt_tables' 2>/dev/null)" != FORCE ]; then
    echo "casd: WARNING: the running MariaDB in $dir is not encrypted at rest; stopping it" >&2
    mariadb-admin --no-defaults --socket="$dir/mysqld.sock" -u"$(id -un)" shutdown \
      || casd_die "cannot stop the unencrypted MariaDB in $dir"
  fi
  if [ -d "$dir/data/mysql" ] && [ ! -f "$dir/encrypted-at-rest" ]; then
    local old; old="$dir/data.unencrypted.$(date -u +%Y%m%dT%H%M%SZ)"
    mv "$dir/data" "$old"
    echo "casd: WARNING: ******************************************************" >&2
    echo "casd: WARNING: $dir/data was NOT encrypted at rest (older scripts)." >&2
    echo "casd: WARNING: moved it to $old and creating a new, encrypted one." >&2
    echo "casd: WARNING: its casd data is NOT migrated; delete it when done: rm -rf $old" >&2
    echo "casd: WARNING: ******************************************************" >&2
  fi
}

# Brings up the instance in DIR on PORT (options from casd_mariadb_options;
# any further arguments are extra mariadbd options, e.g. a test's
# --skip-ssl): moves unencrypted data aside, initialises a data directory
# on first use, starts the server unless it runs, and makes the casd user
# (password in DIR/casd.password; it may create databases: tests make one
# each). Writes DIR/server-url: mysql://casd:...@127.0.0.1:PORT.
casd_mariadb_instance_up() {
  local dir="$1" port="$2" id="$3"
  shift 3
  casd_mariadb_retire_plain "$dir"
  casd_mariadb_config "$dir" "$port" "$id"
  [ -d "$dir/data/mysql" ] || casd_mariadb_install "$dir"
  if ! casd_mariadb_ping "$dir"; then
    echo "casd: starting MariaDB on 127.0.0.1:$port" >&2
    casd_mariadb_start "$dir" "$@"
  fi
  if [ ! -s "$dir/casd.password" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$dir/casd.password")
  fi
  local pw; pw=$(cat "$dir/casd.password")
  # Outside the binary log: users are each instance's own (a replica's
  # restart must not write a transaction of its own into the group's GTID
  # history, which gtid_strict_mode then refuses to continue).
  casd_mariadb_sql "$dir" "SET sql_log_bin = 0;
    CREATE USER IF NOT EXISTS 'casd'@'127.0.0.1' IDENTIFIED BY '$pw';
    ALTER USER 'casd'@'127.0.0.1' IDENTIFIED BY '$pw';
    GRANT ALL PRIVILEGES ON *.* TO 'casd'@'127.0.0.1';" \
    || casd_die "cannot create the casd user in $dir"
  (umask 077; echo "mysql://casd:$pw@127.0.0.1:$port" >"$dir/server-url")
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
  if [ ! -f "$CASD_DB_DIR/port" ]; then
    # A free port in a private range, fixed for this state directory.
    local p
    for p in $(seq 33306 33406); do
      if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p" >"$CASD_DB_DIR/port"; break; fi
    done
  fi
  CASD_DB_PORT=$(cat "$CASD_DB_DIR/port")
  casd_mariadb_instance_up "$CASD_DB_DIR" "$CASD_DB_PORT" 1
  local pw; pw=$(cat "$CASD_DB_DIR/casd.password")
  casd_db_sql "CREATE DATABASE IF NOT EXISTS casd CHARACTER SET utf8mb4;" \
    || casd_die "cannot create the casd database"
  export CASD_DATABASE_URL="mysql://casd:$pw@127.0.0.1:$CASD_DB_PORT/casd"
  export CASD_TEST_DATABASE_URL="mysql://casd:$pw@127.0.0.1:$CASD_DB_PORT"
  CASD_TEST_DATABASE_CA="$(casd_mariadb_secrets_dir "$CASD_DB_DIR")/ca.pem"
  export CASD_TEST_DATABASE_CA
  (umask 077; echo "$CASD_TEST_DATABASE_URL" >"$CASD_STATE_DIR/test-database-url")
}

# ---------------------------------------------------------------------------
# A replication group: a primary and a semi-synchronous replica (GTID, over
# TLS), each an instance of casd_mariadb_instance_up with its own data
# directory, port and socket, siblings under one directory GROUP (so they
# share GROUP/mariadb-secrets: the at-rest key file and the CA).
#
#   casd_mariadb_pair_up GROUP [TIMEOUT_MS]   primary GROUP/a + replica GROUP/b
#   casd_mariadb_member_start GROUP/x ID [TIMEOUT_MS]   (re)start one, read-only
#
# Files: GROUP/x/port; GROUP/casd.password (user casd, the same on every
# member), GROUP/admin.password (user casd_admin, for `casd db promote`),
# GROUP/repl.password (user repl); GROUP/url (database casd on the
# primary) and GROUP/servers (host:port, comma separated, primary first).
# ---------------------------------------------------------------------------

# The options a group member adds to casd_mariadb_options (which has the
# binary log, GTIDs and server id), one a line. Every member STARTS
# read-only and without the semi-sync master side: a primary killed and
# restarted comes back fenced (it cannot take writes that the promoted
# replica never saw); only the bring-up or `casd db promote` makes one
# member writable and semi-sync master, at run time (a replica with the
# master side on would wait for acks of its own replication stream's
# transactions). AFTER_SYNC: the commit is acknowledged to the client only
# after a replica has it in its relay log, so a 200 survives the primary's
# loss. After TIMEOUT_MS without an ack the primary falls back to
# asynchronous (casd logs it and sets casd_database_semi_sync_active to 0).
casd_mariadb_replication_options() {
  local timeout_ms=${1:-10000}
  printf -- '--%s\n' sync-binlog=1 relay-log-recovery=ON \
    rpl-semi-sync-master-enabled=OFF rpl-semi-sync-slave-enabled=ON \
    rpl-semi-sync-master-wait-point=AFTER_SYNC \
    "rpl-semi-sync-master-timeout=$timeout_ms" read-only=ON
}

# The casd user of a member keeps every privilege on data but none that
# bypasses read_only (SUPER, READ ONLY ADMIN): on a fenced or replica member
# its writes fail (1290) instead of forking the group's history. Outside
# the binary log: each member manages its own users.
casd_member_fence_casd_user() {
  casd_mariadb_sql "$1" "SET sql_log_bin = 0;
    REVOKE SUPER, READ_ONLY ADMIN ON *.* FROM 'casd'@'127.0.0.1';" \
    || casd_die "cannot restrict the casd user of $1"
}

# Starts (initialising on first use) the member in directory $1 with server
# id $2 on its port (a free one chosen once, kept in $1/port).
casd_mariadb_member_start() {
  local dir=$1 id=$2 timeout_ms=${3:-10000}
  casd_install_mariadb
  mkdir -p "$dir"; chmod 700 "$dir"
  if [ ! -s "$dir/port" ]; then
    # The kernel's choice of a free port, kept for this member.
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' >"$dir/port" \
      || casd_die "cannot pick a port"
  fi
  # One casd password for the whole group: casd's URL works on any member.
  (umask 077; cp "$(dirname "$dir")/casd.password" "$dir/casd.password")
  # shellcheck disable=SC2046 # one option a word
  casd_mariadb_instance_up "$dir" "$(cat "$dir/port")" "$id" \
    $(casd_mariadb_replication_options "$timeout_ms")
  casd_member_fence_casd_user "$dir"
}

# Users of the group (once, outside the binary log), then an empty binary
# log, so that the replica starts from the primary's first transaction.
casd_member_users() {
  local dir=$1 group=$2
  casd_mariadb_sql "$dir" "SET sql_log_bin = 0;
    CREATE USER IF NOT EXISTS 'casd_admin'@'127.0.0.1' IDENTIFIED BY '$(cat "$group/admin.password")';
    GRANT ALL PRIVILEGES ON *.* TO 'casd_admin'@'127.0.0.1';
    CREATE USER IF NOT EXISTS 'repl'@'127.0.0.1' IDENTIFIED BY '$(cat "$group/repl.password")' REQUIRE SSL;
    GRANT REPLICATION SLAVE ON *.* TO 'repl'@'127.0.0.1';
    RESET MASTER;" \
    || casd_die "cannot create the users of $dir"
}

# Points member $1 at member $2 (GTID, from where it is, over verified TLS)
# and starts replicating.
casd_member_follow() {
  casd_mariadb_sql "$1" "STOP SLAVE; CHANGE MASTER TO MASTER_HOST='127.0.0.1',
    MASTER_PORT=$(cat "$2/port"), MASTER_USER='repl',
    MASTER_PASSWORD='$(cat "$(dirname "$1")/repl.password")',
    MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1, $(casd_mariadb_master_ssl "$1");
    START SLAVE;" \
    || casd_die "cannot make $1 replicate from $2"
}

casd_mariadb_pair_up() {
  local group=$1 timeout_ms=${2:-10000} f
  mkdir -p "$group"; chmod 700 "$group"
  for f in casd admin repl; do
    [ -s "$group/$f.password" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$group/$f.password")
  done
  casd_mariadb_member_start "$group/a" 1 "$timeout_ms"
  casd_mariadb_member_start "$group/b" 2 "$timeout_ms"
  # Once only: later runs just start the members, read-only both (a
  # restarted group has its primary chosen by `casd db promote`, never by
  # this script, which cannot know which member is ahead).
  [ -f "$group/initialised" ] && return 0
  casd_member_users "$group/a" "$group"
  casd_member_users "$group/b" "$group"
  casd_member_follow "$group/b" "$group/a"
  casd_mariadb_sql "$group/a" "SET GLOBAL rpl_semi_sync_master_enabled = ON; SET GLOBAL read_only = OFF;
    CREATE DATABASE IF NOT EXISTS casd CHARACTER SET utf8mb4;" \
    || casd_die "cannot make $group/a the primary"
  local pa pb; pa=$(cat "$group/a/port"); pb=$(cat "$group/b/port")
  (umask 077
   echo "mysql://casd:$(cat "$group/casd.password")@127.0.0.1:$pa/casd" >"$group/url"
   echo "127.0.0.1:$pa,127.0.0.1:$pb" >"$group/servers")
  touch "$group/initialised"
}

# scripts/run.sh --replicated: the group under $CASD_STATE_DIR/mariadb-group,
# its URL, servers and CA exported as casd's configuration.
casd_mariadb_group_up() {
  : "${CASD_STATE_DIR:=$CASD_ROOT/.state}"
  export CASD_STATE_DIR
  local group="$CASD_STATE_DIR/mariadb-group"
  casd_mariadb_pair_up "$group"
  CASD_DATABASE_URL=$(cat "$group/url")
  CASD_DATABASE__SERVERS="[\"$(sed 's/,/", "/g' "$group/servers")\"]"
  CASD_DATABASE__TLS_CA="$group/mariadb-secrets/ca.pem"
  export CASD_DATABASE_URL CASD_DATABASE__SERVERS CASD_DATABASE__TLS_CA
  echo "casd: replication group $(cat "$group/servers"); fail over (or choose the primary" \
    "after a restart of both) with: CASD_CONFIG=$CASD_STATE_DIR/casd.toml" \
    "CASD_DATABASE__SERVERS='$CASD_DATABASE__SERVERS' CASD_DATABASE__TLS_CA=$CASD_DATABASE__TLS_CA" \
    "target/release/casd db promote --admin-user casd_admin --admin-password-file $group/admin.password" >&2
}
