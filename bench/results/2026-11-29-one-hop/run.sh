#!/usr/bin/env bash
# One-hop latency on the embedded engine: one message in flight at a time
# between two users (palaver-bench's one-hop scenario), 32-byte bodies (the bench minimum).
# The gateway's per-connection Send limit (50/s by default) is lifted: one
# connection sends every message here.
#   cargo build --release -p palaver-gateway -p palaver-bench
#   bench/results/2026-11-29-one-hop/run.sh [RATE] [SECONDS] [OUT]
set -euo pipefail
rate=${1:-1000}; secs=${2:-20}; out=${3:-run-$rate}
root=$(cd "$(dirname "$0")/../../.." && pwd)
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$root/target/release/palaver-gateway" --listen 127.0.0.1:$port --data-dir "$work" --cores 2 --max-sends-per-second 100000 --max-account-sends-per-second 100000 > "$work/gw.log" 2>&1 &
gw=$!
trap 'kill $gw 2>/dev/null; rm -rf "$work"' EXIT
until [ -e "$work/jwt-hs256.secret" ] && (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
echo "load before: $(cat /proc/loadavg)" > "$(dirname "$0")/$out.load"
"$root/target/release/palaver-bench" run --scenario one-hop --connections 2 --workers 1 \
  --rate "$rate" --duration "${secs}s" --body-bytes 32 --settle 1s \
  --target 127.0.0.1:$port --data-dir "$work" --gateway-pid $gw --out "$(dirname "$0")/$out"
echo "load after: $(cat /proc/loadavg)" >> "$(dirname "$0")/$out.load"
