#!/usr/bin/env bash
# What quick_repair buys: SIGKILL a durable gateway in the middle of 1:1
# chat at RATE msg/s after SECONDS, then start it again on the same data
# dir and time how long until it accepts connections (redb opens the file:
# with quick_repair its allocator state is read back; without it the whole
# file is walked to rebuild it).
#   flock -o /tmp/palaver-bench.lock [PALAVER_DISK_QUICK_REPAIR=0] \
#     bench/results/2026-12-07-durable-embedded-2/recovery.sh RATE SECONDS
set -euo pipefail
rate=$1; secs=$2
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
gwbin=${GWBIN:-$root/target/release/palaver-gateway}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
gw=
trap '[ -n "$gw" ] && kill -9 $gw 2>/dev/null; rm -rf "$work"' EXIT
start() {
  "$gwbin" --listen 127.0.0.1:$port --data-dir "$work" --cores 2 >> "$work/gw.log" 2>&1 &
  gw=$!
}
ready() { until (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.01; done; }
start
until [ -e "$work/jwt-hs256.secret" ]; do sleep 0.1; done
ready
"$root/target/release/palaver-bench" run "$root/bench/scenarios/chat-1to1.toml" \
  --rate "$rate" --duration "$((secs + 30))s" --target 127.0.0.1:$port --data-dir "$work" \
  --out "$work/bench" > /dev/null 2>&1 &
bench=$!
# The kill point (a measurement, not a synchronisation).
sleep "$secs"
kill -9 $gw
wait $gw 2>/dev/null || true
kill $bench 2>/dev/null || true
wait $bench 2>/dev/null || true
echo "killed after ${secs}s at $rate msg/s; store file $(stat -c %s "$work/store/palaver.redb") bytes; load $(cut -d' ' -f1 /proc/loadavg)"
t0=$(date +%s.%N)
start
ready
t1=$(date +%s.%N)
echo "restart to accepting: $(python3 -c "print(f'{$t1-$t0:.3f}')") s (quick_repair=${PALAVER_DISK_QUICK_REPAIR:-1})"
