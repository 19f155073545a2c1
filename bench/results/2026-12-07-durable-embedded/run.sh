#!/usr/bin/env bash
# 1:1 chat (bench/scenarios/chat-1to1.toml: 10,000 users, 2 bench workers)
# against one embedded-engine gateway with 2 core threads, at one rate,
# durable (the default) or in memory (pass --ephemeral as a gateway flag).
# Records the load average before and after, and the durable store's size
# after the run (store.txt) for bytes per message.
#   cargo build --release -p palaver-gateway -p palaver-bench
#   flock -o /tmp/palaver-bench.lock \
#     bench/results/2026-12-07-durable-embedded/run.sh RATE SECONDS OUT [gateway flags...]
set -euo pipefail
rate=$1; secs=$2; out=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
gwbin=$root/target/release/palaver-gateway
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$gwbin" --listen 127.0.0.1:$port --data-dir "$work" --cores 2 "$@" > "$work/gw.log" 2>&1 &
gw=$!
trap 'kill $gw 2>/dev/null; rm -rf "$work"' EXIT
until [ -e "$work/jwt-hs256.secret" ] && (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
mkdir -p "$here/$out"
{
  echo "gateway: $gwbin --cores 2 $*"
  echo "load before: $(cat /proc/loadavg)"
} > "$here/$out/load.txt"
"$root/target/release/palaver-bench" run "$root/bench/scenarios/chat-1to1.toml" \
  --rate "$rate" --duration "${secs}s" \
  --target 127.0.0.1:$port --data-dir "$work" --gateway-pid $gw --out "$here/$out" \
  > "$here/$out/stdout.txt" 2> "$here/$out/stderr.txt" || echo "bench exit $?" >> "$here/$out/load.txt"
echo "load after: $(cat /proc/loadavg)" >> "$here/$out/load.txt"
grep -m1 "backend" "$work/gw.log" > "$here/$out/backend.txt" || true
if [ -f "$work/store/palaver.redb" ]; then
  {
    echo "file bytes: $(stat -c %s "$work/store/palaver.redb")"
    echo "disk bytes: $(( $(stat -c %b "$work/store/palaver.redb") * $(stat -c %B "$work/store/palaver.redb") ))"
  } > "$here/$out/store.txt"
fi
