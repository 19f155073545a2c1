#!/usr/bin/env bash
# CPU profile of the gateway under chat-1to1 (as run.sh) at one rate:
# perf record -F 999 -g on the gateway for 12 s of the sending phase
# (software cpu-clock sampling: this VM has no hardware counters), then
# the split by thread and kernel/user, and the top symbols.
#   profile.sh GATEWAY_BINARY RATE OUT.txt
set -euo pipefail
gwbin=$1; rate=$2; out=$3
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$gwbin" --listen 127.0.0.1:$port --data-dir "$work" --cores 2 > "$work/gw.log" 2>&1 &
gw=$!
trap 'kill $gw 2>/dev/null; rm -rf "$work"' EXIT
until [ -e "$work/jwt-hs256.secret" ] && (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
"$root/target/release/palaver-bench" run "$root/bench/scenarios/chat-1to1.toml" \
  --rate "$rate" --duration 25s --target 127.0.0.1:$port --data-dir "$work" --gateway-pid $gw \
  --out "$work/bench" > "$work/bench.txt" 2>&1 &
bench=$!
# Wait for the sending phase (the bench prints per-second progress).
until grep -q "chatting" "$work/bench.txt" 2>/dev/null; do sleep 0.5; done
sleep 3
{
  echo "# perf record -F 999 -g -p <gateway> -- sleep 12, chat-1to1 at $rate msg/s, $gwbin"
  echo "# load before: $(cat /proc/loadavg)"
} > "$here/$out"
perf record -F 999 -g -p $gw -o "$work/perf.data" -- sleep 12 2> /dev/null
echo "# load after: $(cat /proc/loadavg)" >> "$here/$out"
wait $bench || true
perf report -i "$work/perf.data" --no-children --sort comm,dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -20 >> "$here/$out"
echo >> "$here/$out"
perf report -i "$work/perf.data" --no-children --sort comm,sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60 >> "$here/$out"
grep -E "e2e|per sent message|acked" "$work/bench/stdout.txt" "$work/bench.txt" 2>/dev/null | head -5 >> "$here/$out" || true
