#!/usr/bin/env bash
# 1:1 chat (bench/scenarios/chat-1to1.toml: 10,000 users, 2 bench workers)
# against one embedded-engine gateway with 2 core threads, at one rate;
# ../2026-11-29-embedded-path/run.sh unchanged but for the output folder.
#   run.sh GATEWAY_BINARY RATE [SECONDS] [OUT]
set -euo pipefail
gwbin=$1; rate=$2; secs=${3:-15}; out=${4:-run-$rate}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
# Results go to $OUT_DIR/OUT (default: this folder), so later folders reuse the script.
dest=${OUT_DIR:-$here}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$gwbin" --listen 127.0.0.1:$port --data-dir "$work" --cores 2 > "$work/gw.log" 2>&1 &
gw=$!
trap 'kill $gw 2>/dev/null; rm -rf "$work"' EXIT
until [ -e "$work/jwt-hs256.secret" ] && (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
mkdir -p "$dest/$out"
echo "gateway: $gwbin" > "$dest/$out/load.txt"
echo "load before: $(cat /proc/loadavg)" >> "$dest/$out/load.txt"
"$root/target/release/palaver-bench" run "$root/bench/scenarios/chat-1to1.toml" \
  --rate "$rate" --duration "${secs}s" \
  --target 127.0.0.1:$port --data-dir "$work" --gateway-pid $gw --out "$dest/$out" \
  > "$dest/$out/stdout.txt" 2> "$dest/$out/stderr.txt" || echo "bench exit $?" >> "$dest/$out/load.txt"
echo "load after: $(cat /proc/loadavg)" >> "$dest/$out/load.txt"
