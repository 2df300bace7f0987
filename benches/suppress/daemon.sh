# The daemon of the suppression list's benches, sourced by page.sh and
# refresh.sh with BIN (a mailmux binary) and N set: BIN serving HTTP on a
# fresh SQLite store in a temporary folder (which becomes the working
# folder, removed at exit with the daemon stopped), with the `file` relay
# and one operator whose token is $TOKEN; N addresses listed by the queue
# command (one import), and 3 s for the daemon to read them. Leaves PID,
# PORT, `ticks` (the daemon's CPU time in clock ticks) and `hz`.
DIR=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$DIR"' EXIT
cd "$DIR"
TOKEN=bench-operator-token
SHA=$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)
cat > mailmux.toml <<EOT
from_email = "agent@example.org"
[queue]
path = "$DIR/queue.db"
[[relays]]
name = "outbox"
kind = "file"
dir = "$DIR/outbox"
[[operators]]
name = "bench"
token_sha256 = "$SHA"
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
