#!/usr/bin/env bash
# What a change of a large suppression list costs a running daemon.
#
#   sh benches/suppress/refresh.sh BIN N
#
# Starts BIN (a mailmux binary) over HTTP on a fresh SQLite store in a
# temporary folder, with the `file` relay; lists N addresses with the queue
# command (one import; both in daemon.sh); then reads the daemon's CPU time from /proc over
# 10 s left alone, and over 10 changes of the list made one a second by the
# queue command, and prints both with the daemon's resident size.
set -eu
BIN=$1
N=$2
. "$(cd "$(dirname "$0")" && pwd)/daemon.sh"
t0=$(ticks); sleep 10; t1=$(ticks)
echo "$N listed; left alone 10 s: $(( (t1 - t0) * 1000 / hz )) ms of daemon CPU"
t0=$(ticks)
for i in 1 2 3 4 5 6 7 8 9 10; do
  "$BIN" --config mailmux.toml queue suppress add "new-$i@example.org" > /dev/null
  sleep 1
done
t1=$(ticks)
echo "10 changes, one a second: $(( (t1 - t0) * 1000 / hz )) ms of daemon CPU; resident $(awk '/VmRSS/ { print $2 }' "/proc/$PID/status") kB"
