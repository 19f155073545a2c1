#!/usr/bin/env bash
# One-hop through a Palaver gateway (--cores 1) with the same blocking
# client as mosquitto.sh (mqtt-one-hop in palaver mode: one thread, write the
# Send → read the Deliver, 32-byte body, 1,000/s for 20 s).
#   palaver-blocking.sh GATEWAY_BINARY [RATE] [SECONDS] [OUT]
set -euo pipefail
gwbin=$1; rate=${2:-1000}; secs=${3:-20}; out=${4:-blocking-$rate}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
client=${MQTT_ONE_HOP:-/tmp/mqtt-target/release/mqtt-one-hop}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$gwbin" --listen 127.0.0.1:$port --data-dir "$work" --cores 1 --max-sends-per-second 100000 --max-account-sends-per-second 100000 > "$work/gw.log" 2>&1 &
gw=$!
trap 'kill $gw 2>/dev/null; rm -rf "$work"' EXIT
until [ -e "$work/jwt-hs256.secret" ] && (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
ta=$("$root/target/release/palaver" token --user hop-a --data-dir "$work")
tb=$("$root/target/release/palaver" token --user hop-b --data-dir "$work")
mkdir -p "$here/$out"
echo "gateway: $gwbin --cores 1" > "$here/$out/load.txt"
echo "load before: $(cat /proc/loadavg)" >> "$here/$out/load.txt"
"$client" 127.0.0.1:$port "$work/ca.pem" "$rate" "$secs" $gw palaver "$ta" "$tb" hop-a hop-b \
  > "$here/$out/stdout.txt" 2> "$here/$out/stderr.txt" || echo "client exit $?" >> "$here/$out/load.txt"
echo "load after: $(cat /proc/loadavg)" >> "$here/$out/load.txt"
