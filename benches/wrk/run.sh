#!/bin/sh
# MCP over streamable HTTP driven by wrk (stateless JSON-RPC, JSON responses)
# next to smtp-source, in one run, on this machine. Each daemon path runs
# for DURATION seconds at C connections with 1 KiB messages; the daemon's
# CPU per message comes from /proc.
#
#   cargo build --release
#   sh benches/wrk/run.sh [C] [DURATION]        # defaults: 32 10
#   WRK_TLS=1 sh benches/wrk/run.sh 32 10       # each store over HTTPS too
#
# With WRK_TLS=1 each store also runs with `http.tls_cert`/`http.tls_key`
# (a throwaway self-signed P-256 certificate made with openssl), and wrk
# posts over https on connections it keeps: the handshake is paid once per
# connection, so the rows show what TLS costs a call.
#
# The daemon logs at `warn` (RUST_LOG); MAILMUX_LOG=info runs it at the
# level it has by default, which writes one line a call. WRK_STATEFUL=1
# starts it with sessions (the default mode, without `--stateless`), for
# calls of protocol 2026-07-28 (WRK_PROTOCOL, see send_email.lua).
#
# Needs wrk, Postfix's smtp-sink and smtp-source. Everything listens on
# 127.0.0.1 on free ports chosen by the kernel.
set -eu
C=${1:-32}
DURATION=${2:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${MAILMUX_BIN:-$HERE/../../target/release/mailmux}
MODE=--stateless
if [ "${WRK_STATEFUL:-0}" = 1 ]; then MODE=; fi
# The daemon runs in a folder of its own: a relative path is the caller's.
case $BIN in /*) ;; *) BIN=$PWD/$BIN ;; esac
WORK=$(mktemp -d)
PIDS=""
cleanup() { for p in $PIDS; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

start_sink() {
  SINK_PORT=$(free_port)
  /usr/sbin/smtp-sink -c -u nobody "127.0.0.1:$SINK_PORT" 256 >"$WORK/sink.out" 2>&1 &
  SINK=$!; PIDS="$PIDS $SINK"; sleep 0.3
}
stop_sink() { kill "$SINK"; wait "$SINK" 2>/dev/null || true; }

echo "| path (1 KiB, C=$C) | msgs/s | vs smtp-source | daemon CPU µs/msg | p50 ms | p99 ms |"
echo "|---|---|---|---|---|---|"

start_sink
N=20000
t0=$(date +%s.%N)
/usr/sbin/smtp-source -d -s "$C" -m "$N" -l 1024 -M localhost -f sender@localhost -t rcpt@localhost "127.0.0.1:$SINK_PORT" >/dev/null
t1=$(date +%s.%N)
stop_sink
SOURCE=$(echo "$N / ($t1 - $t0)" | bc -l)
printf "| smtp-source | %.0f | 100 %% | | | |\n" "$SOURCE"

SCHEMES=http
if [ "${WRK_TLS:-0}" = 1 ]; then
  SCHEMES="http https"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 1 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
  chmod 600 "$WORK/key.pem"
fi

for store in sqlite memory; do
for scheme in $SCHEMES; do
  start_sink
  PORT=$(free_port)
  DIR=$WORK/$store-$scheme
  mkdir -p "$DIR"
  cat >"$DIR/mailmux.toml" <<TOML
from_email = "sender@localhost"
send_deadline = "300s"
message_id_domain = "load.localhost"

[queue]
store = "$store"

[[relays]]
name = "sink"
host = "127.0.0.1"
port = $SINK_PORT
tls = "none"
hello_name = "localhost"
max_connections = $C
max_queued = 100000
messages_per_connection = 0
TOML
  if [ "$scheme" = https ]; then
    printf '\n[http]\ntls_cert = "%s"\ntls_key = "%s"\n' "$WORK/cert.pem" "$WORK/key.pem" >>"$DIR/mailmux.toml"
  fi
  (cd "$DIR" && RUST_LOG=${MAILMUX_LOG:-warn} exec "$BIN" --config mailmux.toml serve --http "127.0.0.1:$PORT" $MODE) >"$DIR/daemon.log" 2>&1 &
  D=$!; PIDS="$PIDS $D"; sleep 1
  before=$(ticks "$D")
  out=$(wrk -t1 -c"$C" -d"${DURATION}s" -s "$HERE/send_email.lua" "$scheme://127.0.0.1:$PORT/mcp")
  after=$(ticks "$D")
  kill "$D"; wait "$D" 2>/dev/null || true
  stop_sink
  line=$(echo "$out" | grep '^answers:')
  sent=$(echo "$line" | sed -E 's/answers: ([0-9]+) sent.*/\1/')
  rate=$(echo "$line" | sed -E 's/.*; ([0-9]+) sent\/s.*/\1/')
  p50=$(echo "$line" | sed -E 's/.*p50 ([0-9.]+) ms.*/\1/')
  p99=$(echo "$line" | sed -E 's/.*p99 ([0-9.]+) ms.*/\1/')
  cpu=$(echo "($after - $before) / $hz * 1000000 / $sent" | bc -l)
  share=$(echo "100 * $rate / $SOURCE" | bc -l)
  label=HTTP; [ "$scheme" = https ] && label=HTTPS
  printf "| MCP %s via wrk, %s | %s | %.0f %% | %.1f | %s | %s |\n" "$label" "$store" "$rate" "$share" "$cpu" "$p50" "$p99"
  echo "$out" | grep -v '^answers:' | grep -i 'not sent\|error' >&2 || true
done
done
