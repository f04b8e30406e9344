#!/usr/bin/env bash
# Soak test of a netcluster primary (not run in CI; results in docs/reliability.md):
#   1. 1,000 worker deaths (SIGKILL), each slot restarted by the primary,
#   2. 100,000 round-robin hand-offs (echo connections, every one checked),
#   3. 100 scale up/down cycles (1 -> 4 -> 1 workers, through the control socket),
# printing the primary's descriptor count and RSS before and after each phase.
#
#   bash benches/soak.sh [DEATHS] [HANDOFFS] [CYCLES]
#
# Needs python3 (for the client load). Builds the release binary first.
set -euo pipefail
cd "$(dirname "$0")/.."
DEATHS=${1:-1000}
HANDOFFS=${2:-100000}
CYCLES=${3:-100}

cargo build --release --quiet
BIN=$PWD/target/release/netcluster
DIR=$(mktemp -d)
CTL=$DIR/control.sock
trap 'kill -9 $PRIMARY 2>/dev/null || true; rm -rf "$DIR"' EXIT

"$BIN" serve --workers 4 --listen 127.0.0.1:0 --control "$CTL" --restart-max 0.1 \
  >"$DIR/out" 2>"$DIR/err" &
PRIMARY=$!
for _ in $(seq 100); do grep -q "listening on" "$DIR/out" 2>/dev/null && break; sleep 0.05; done
PORT=$(sed -n 's/.*:\([0-9]*\)$/\1/p' "$DIR/out" | head -1)
"$BIN" scale 4 --control "$CTL" >/dev/null

measure() {
  local fds rss
  fds=$(ls /proc/$PRIMARY/fd | wc -l)
  rss=$(awk '/VmRSS/ {print $2}' /proc/$PRIMARY/status)
  printf '%-28s primary fds %4s  RSS %6s KiB\n' "$1" "$fds" "$rss"
}
workers() {
  "$BIN" status --json --control "$CTL" |
    python3 -c 'import json,sys; print(" ".join(str(w["pid"]) for w in json.load(sys.stdin)["workers"] if w["state"]=="listening"))'
}

echo "soak: $DEATHS deaths, $HANDOFFS hand-offs, $CYCLES scale cycles (primary pid $PRIMARY, port $PORT)"
measure "start"

# 1. Deaths.
start=$(date +%s.%N)
killed=0
while [ "$killed" -lt "$DEATHS" ]; do
  for pid in $(workers); do
    kill -9 "$pid" 2>/dev/null && killed=$((killed + 1))
    [ "$killed" -ge "$DEATHS" ] && break
  done
  sleep 0.05
done
"$BIN" scale 4 --control "$CTL" >/dev/null  # wait until every slot is back
sleep 1
measure "after $killed deaths"
echo "  ($(python3 -c "print(round($(date +%s.%N) - $start, 1))") s)"

# 2. Hand-offs.
python3 - "$PORT" "$HANDOFFS" <<'EOF'
import socket, sys, threading, time
port, total = int(sys.argv[1]), int(sys.argv[2])
clients = 8
ok = [0] * clients
bad = [0] * clients
def run(i):
    for n in range(total // clients):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.settimeout(10)
            d = b""
            while len(d) < 7:
                c = s.recv(7 - len(d))
                if not c: raise OSError("eof")
                d += c
            s.sendall(b"soak\n")
            b = b""
            while len(b) < 5:
                c = s.recv(5 - len(b))
                if not c: raise OSError("eof")
                b += c
            s.close()
            ok[i] += 1
        except OSError:
            bad[i] += 1
t = time.time()
ts = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
[x.start() for x in ts]
[x.join() for x in ts]
print(f"  hand-offs: {sum(ok)} served, {sum(bad)} failed in {time.time() - t:.1f} s")
EOF
sleep 1
measure "after $HANDOFFS hand-offs"

# 3. Scale cycles.
start=$(date +%s.%N)
for _ in $(seq "$CYCLES"); do
  "$BIN" scale 1 --control "$CTL" >/dev/null
  "$BIN" scale 4 --control "$CTL" >/dev/null
done
sleep 1
measure "after $CYCLES scale cycles"
echo "  ($(python3 -c "print(round($(date +%s.%N) - $start, 1))") s)"
"$BIN" stop --control "$CTL"
