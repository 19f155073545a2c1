#!/usr/bin/env bash
# As ../2026-12-07-durable-embedded/run.sh (bench/scenarios/chat-1to1.toml:
# 10,000 users, 2 bench workers, against one embedded-engine gateway with 2
# core threads, fresh data dir), plus: GWBIN picks the gateway binary (the
# before and after builds in one session), and the gateway's
# "durable store:" stats lines (commits, messages per commit, bytes written,
# commit and fsync times, every 10 s) are kept in disk-stats.txt.
#   cargo build --release -p palaver-gateway -p palaver-bench
#   flock -o /tmp/palaver-bench.lock \
#     [GWBIN=path] [PALAVER_DISK_...=0] bench/results/2026-12-07-durable-embedded-2/run.sh RATE SECONDS OUT [gateway flags...]
set -euo pipefail
rate=$1; secs=$2; out=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
gwbin=${GWBIN:-$root/target/release/palaver-gateway}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$gwbin" --listen 127.0.0.1:$port --data-dir "$work" --cores 2 "$@" > "$work/gw.log" 2>&1 &
gw=$!
trap 'kill $gw 2>/dev/null; rm -rf "$work"' EXIT
until [ -e "$work/jwt-hs256.secret" ] && (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
mkdir -p "$here/$out"
{
  echo "gateway: $gwbin --cores 2 $*"
  env | grep '^PALAVER_DISK_' || true
  echo "load before: $(cat /proc/loadavg)"
} > "$here/$out/load.txt"
"$root/target/release/palaver-bench" run "$root/bench/scenarios/chat-1to1.toml" \
  --rate "$rate" --duration "${secs}s" \
  --target 127.0.0.1:$port --data-dir "$work" --gateway-pid $gw --out "$here/$out" \
  > "$here/$out/stdout.txt" 2> "$here/$out/stderr.txt" || echo "bench exit $?" >> "$here/$out/load.txt"
echo "load after: $(cat /proc/loadavg)" >> "$here/$out/load.txt"
grep -m1 "backend" "$work/gw.log" > "$here/$out/backend.txt" || true
grep "durable store:" "$work/gw.log" | sed 's/\x1b\[[0-9;]*m//g' > "$here/$out/disk-stats.txt" || true
if [ -f "$work/store/palaver.redb" ]; then
  {
    echo "file bytes: $(stat -c %s "$work/store/palaver.redb")"
    echo "disk bytes: $(( $(stat -c %b "$work/store/palaver.redb") * $(stat -c %B "$work/store/palaver.redb") ))"
  } > "$here/$out/store.txt"
fi
