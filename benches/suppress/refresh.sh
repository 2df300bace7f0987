#!/usr/bin/env bash
# What a change of a large suppression list costs a running daemon.
#
#   sh benches/suppress/refresh.sh BIN N
#
# Starts BIN (a mailmux binary) over HTTP on a fresh SQLite store in a
# temporary folder, with the `file` relay; lists N addresses with the queue
# command (one import); then reads the daemon's CPU time from /proc over
# 10 s left alone, and over 10 changes of the list made one a second by the
# queue command, and prints both with the daemon's resident size.
set -eu
BIN=$1
N=$2
DIR=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$DIR"' EXIT
cd "$DIR"
cat > mailmux.toml <<EOT
from_email = "agent@example.org"
[queue]
path = "$DIR/queue.db"
[[relays]]
name = "outbox"
kind = "file"
dir = "$DIR/outbox"
EOT
i=0
while [ "$i" -lt "$N" ]; do
  printf 'someone.%07d@example-domain.org\n' "$i"
  i=$((i + 1))
done > list.txt
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN" --config mailmux.toml serve --http "127.0.0.1:$PORT" --stateless > daemon.log 2>&1 &
PID=$!
until curl -sf "127.0.0.1:$PORT/health" > /dev/null; do sleep 0.2; done
"$BIN" --config mailmux.toml queue suppress add --file list.txt > /dev/null
sleep 3
ticks() { awk '{ print $14 + $15 }' "/proc/$PID/stat"; }
hz=$(getconf CLK_TCK)
t0=$(ticks); sleep 10; t1=$(ticks)
echo "$N listed; left alone 10 s: $(( (t1 - t0) * 1000 / hz )) ms of daemon CPU"
t0=$(ticks)
for i in 1 2 3 4 5 6 7 8 9 10; do
  "$BIN" --config mailmux.toml queue suppress add "new-$i@example.org" > /dev/null
  sleep 1
done
t1=$(ticks)
echo "10 changes, one a second: $(( (t1 - t0) * 1000 / hz )) ms of daemon CPU; resident $(awk '/VmRSS/ { print $2 }' "/proc/$PID/status") kB"
