#!/usr/bin/env bash
# One-hop latency (palaver-bench one-hop: one message in flight between two
# users, 32-byte bodies) against a given gateway binary; the same command as
# bench/results/2026-11-29-one-hop/run.sh with the binary as a parameter.
#   one-hop.sh GATEWAY_BINARY [RATE] [SECONDS] [OUT]
set -euo pipefail
gwbin=$1; rate=${2:-1000}; secs=${3:-20}; out=${4:-one-hop-$rate}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$gwbin" --listen 127.0.0.1:$port --data-dir "$work" --cores 2 --max-sends-per-second 100000 --max-account-sends-per-second 100000 > "$work/gw.log" 2>&1 &
gw=$!
trap 'kill $gw 2>/dev/null; rm -rf "$work"' EXIT
until [ -e "$work/jwt-hs256.secret" ] && (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
mkdir -p "$here/$out"
echo "gateway: $gwbin" > "$here/$out/load.txt"
echo "load before: $(cat /proc/loadavg)" >> "$here/$out/load.txt"
"$root/target/release/palaver-bench" run --scenario one-hop --connections 2 --workers 1 \
  --rate "$rate" --duration "${secs}s" --body-bytes 32 --settle 1s \
  --target 127.0.0.1:$port --data-dir "$work" --gateway-pid $gw --out "$here/$out" \
  > "$here/$out/stdout.txt" 2> "$here/$out/stderr.txt" || echo "bench exit $?" >> "$here/$out/load.txt"
echo "load after: $(cat /proc/loadavg)" >> "$here/$out/load.txt"
