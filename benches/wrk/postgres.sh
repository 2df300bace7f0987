#!/bin/sh
# MCP over streamable HTTP on the postgres store, driven by wrk, next to
# smtp-source in one run. Starts a throwaway PostgreSQL (fsync on) that logs
# the plan of every statement over 4 ms (auto_explain), then runs each given
# daemon binary in turn, ROUNDS times, each on an emptied table, for
# DURATION seconds at C=32 with 1 KiB messages, and counts its slow
# statements and its sequential scans of the messages table.
#
#   sh benches/wrk/postgres.sh BIN [BIN...]     # ROUNDS=2 DURATION=8 by default
#
# Needs wrk, Postfix's smtp-sink and smtp-source, and Debian's PostgreSQL 15;
# run as root (PostgreSQL runs as the postgres user). Everything listens on
# 127.0.0.1 on free ports chosen by the kernel.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8}
HERE=$(cd "$(dirname "$0")" && pwd)
PGBIN=/usr/lib/postgresql/15/bin
WORK=$(mktemp -d)
chmod 755 "$WORK"
SINKPID=""
cleanup() {
  [ -n "$SINKPID" ] && kill "$SINKPID" 2>/dev/null || true
  su postgres -c "$PGBIN/pg_ctl -D $WORK/pg/data stop -m fast" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir "$WORK/pg"; chown postgres "$WORK/pg"
PGPORT=$(free_port)
su postgres -c "$PGBIN/initdb -D $WORK/pg/data -A trust -U postgres" >/dev/null
printf "session_preload_libraries = 'auto_explain'\nauto_explain.log_min_duration = '4ms'\n" >>"$WORK/pg/data/postgresql.conf"
su postgres -c "$PGBIN/pg_ctl -D $WORK/pg/data -o '-p $PGPORT -k $WORK/pg -c listen_addresses=127.0.0.1' -l $WORK/pg/log start" >/dev/null
LOG=$WORK/pg/log

SINK=$(free_port)
/usr/sbin/smtp-sink -c -u nobody "127.0.0.1:$SINK" 256 >/dev/null 2>&1 &
SINKPID=$!
sleep 0.3
t0=$(date +%s.%N)
/usr/sbin/smtp-source -d -s 32 -m 20000 -l 1024 -M localhost -f sender@localhost -t rcpt@localhost "127.0.0.1:$SINK" >/dev/null
t1=$(date +%s.%N)
printf "smtp-source, C=32: %.0f msgs/s\n" "$(echo "20000 / ($t1 - $t0)" | bc -l)"

round=1
while [ "$round" -le "$ROUNDS" ]; do
  n=0
  for bin in "$@"; do
    n=$((n + 1))
    # The first daemon creates the schema; later ones start on an empty table.
    psql -h 127.0.0.1 -p "$PGPORT" -U postgres -q \
      -c "TRUNCATE mailmux_messages, mailmux_attempts" -c "ANALYZE mailmux_messages" >/dev/null 2>&1 || true
    from=$(($(wc -l <"$LOG") + 1))
    dir=$WORK/daemon$n
    rm -rf "$dir"; mkdir -p "$dir"
    PORT=$(free_port)
    cat >"$dir/mailmux.toml" <<TOML
from_email = "sender@localhost"
send_deadline = "300s"
message_id_domain = "load.localhost"

[queue]
store = "postgres"
url = "postgres://postgres@127.0.0.1:$PGPORT/postgres"

[[relays]]
name = "sink"
host = "127.0.0.1"
port = $SINK
tls = "none"
hello_name = "localhost"
max_connections = 32
max_queued = 100000
messages_per_connection = 0
TOML
    (cd "$dir" && RUST_LOG=warn exec "$bin" --config mailmux.toml serve --http "127.0.0.1:$PORT" --stateless) >"$dir/daemon.log" 2>&1 &
    D=$!
    sleep 1.5
    out=$(wrk -t1 -c32 -d"${DURATION}s" -s "$HERE/send_email.lua" "http://127.0.0.1:$PORT/mcp" | grep '^answers:')
    kill "$D"; wait "$D" 2>/dev/null || true
    slow=$(tail -n +"$from" "$LOG" | grep -c "duration:" || true)
    scans=$(tail -n +"$from" "$LOG" | grep -c "Seq Scan on mailmux_messages" || true)
    echo "round $round, $bin: $out; statements over 4 ms: $slow; Seq Scan on mailmux_messages: $scans"
  done
  round=$((round + 1))
done
