#!/usr/bin/env bash
# One-hop latency (palaver-bench one-hop: one message in flight between two
# users, 32-byte bodies) against a given gateway binary with a given number
# of core threads; ../2026-11-29-one-hop/run.sh with the binary and --cores
# as parameters.
#   one-hop.sh GATEWAY_BINARY CORES [RATE] [SECONDS] [OUT]
set -euo pipefail
gwbin=$1; cores=$2; rate=${3:-1000}; secs=${4:-20}; out=${5:-one-hop-c$cores-$rate}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
# Results go to $OUT_DIR/OUT (default: this folder), so later folders reuse the script.
dest=${OUT_DIR:-$here}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$gwbin" --listen 127.0.0.1:$port --data-dir "$work" --cores "$cores" --max-sends-per-second 100000 --max-account-sends-per-second 100000 > "$work/gw.log" 2>&1 &
gw=$!
trap 'kill $gw 2>/dev/null; rm -rf "$work"' EXIT
until [ -e "$work/jwt-hs256.secret" ] && (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
mkdir -p "$dest/$out"
echo "gateway: $gwbin --cores $cores" > "$dest/$out/load.txt"
echo "load before: $(cat /proc/loadavg)" >> "$dest/$out/load.txt"
"$root/target/release/palaver-bench" run --scenario one-hop --connections 2 --workers 1 \
  --rate "$rate" --duration "${secs}s" --body-bytes 32 --settle 1s \
  --target 127.0.0.1:$port --data-dir "$work" --gateway-pid $gw --out "$dest/$out" \
  > "$dest/$out/stdout.txt" 2> "$dest/$out/stderr.txt" || echo "bench exit $?" >> "$dest/$out/load.txt"
echo "load after: $(cat /proc/loadavg)" >> "$dest/$out/load.txt"
# CPU ticks (utime stime) per gateway thread: with --cores 2, which core
# threads carried the two connections (an idle core thread has ~0).
for t in /proc/$gw/task/*; do echo "thread $(cat $t/comm) $(cut -d' ' -f14,15 $t/stat)"; done >> "$dest/$out/load.txt"
