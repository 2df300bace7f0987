#!/usr/bin/env bash
# What one page of a large suppression list costs: the console's page and
# GET /admin/suppressions?limit=100.
#
#   sh benches/suppress/page.sh BIN N
#
# Starts BIN (a mailmux binary) over HTTP on a fresh SQLite store in a
# temporary folder, with the `file` relay and one operator; lists N
# addresses with the queue command (one import; both in daemon.sh); then asks 20 times for
# each of three pages of 100 (the first, one from the middle, and a search
# by part of an address) and prints, for each, the median time curl waited
# and the daemon's CPU time per request (from /proc), with its resident and
# peak resident size; then asks once for the whole list (no limit) and
# prints its time, size, CPU and the daemon's peak resident size after it.
set -eu
BIN=$1
N=$2
. "$(cd "$(dirname "$0")" && pwd)/daemon.sh"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "127.0.0.1:$PORT/admin/suppressions?limit=1")
[ "$code" = 200 ] || { echo "GET /admin/suppressions answered $code" >&2; exit 1; }
MIDDLE=$(printf 'someone.%07d@example-domain.org' $((N / 2)))
for what in "first ?limit=100" "middle ?limit=100&after=$MIDDLE" "search ?limit=100&q=0012"; do
  set -- $what
  t0=$(ticks)
  for r in $(seq 20); do
    curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $TOKEN" \
      "127.0.0.1:$PORT/admin/suppressions$2"
  done > times.txt
  t1=$(ticks)
  median=$(sort -n times.txt | sed -n 10p)
  echo "$N listed, $1 page of 100: median ${median} s a request, $(( (t1 - t0) * 1000 / hz / 20 )) ms of daemon CPU a request"
done
echo "resident $(awk '/VmRSS/ { print $2 }' "/proc/$PID/status") kB, peak $(awk '/VmHWM/ { print $2 }' "/proc/$PID/status") kB"
t0=$(ticks)
curl -s -o whole.json -w '%{time_total}' -H "Authorization: Bearer $TOKEN" \
  "127.0.0.1:$PORT/admin/suppressions" > time.txt
t1=$(ticks)
echo "$N listed, the whole list: $(cat time.txt) s, $(wc -c < whole.json) bytes, $(( (t1 - t0) * 1000 / hz )) ms of daemon CPU; peak resident since start $(awk '/VmHWM/ { print $2 }' "/proc/$PID/status") kB"
