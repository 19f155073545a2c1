#!/usr/bin/env bash
# One-hop latency through mosquitto (Debian 2.0.11) over TLS 1.3, MQTT 3.1.1
# QoS 0, with mqtt-one-hop/ (the same measurement as palaver-bench one-hop:
# one 32-byte message in flight, write → read; see its src/main.rs).
#   apt-get install -y mosquitto
#   (cd mqtt-one-hop && CARGO_TARGET_DIR=/tmp/mqtt-target cargo build --release --offline)
#   mosquitto.sh [RATE] [SECONDS] [OUT]
set -euo pipefail
rate=${1:-1000}; secs=${2:-20}; out=${3:-mosquitto-$rate}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
# Results go to $OUT_DIR/OUT (default: this folder), so later folders reuse the script.
dest=${OUT_DIR:-$here}
client=${MQTT_ONE_HOP:-/tmp/mqtt-target/release/mqtt-one-hop}
work=$(mktemp -d)
chmod 755 "$work"
"$root/target/release/palaver" certs --out "$work" > /dev/null
chmod 644 "$work"/*
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
cafile $work/ca.pem
certfile $work/server.pem
keyfile $work/server.key
tls_version tlsv1.3
allow_anonymous true
persistence false
log_dest none
CONF
mosquitto -c "$work/mosquitto.conf" &
broker=$!
trap 'kill $broker 2>/dev/null; rm -rf "$work"' EXIT
until (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
mkdir -p "$dest/$out"
echo "broker: mosquitto $(mosquitto -h | head -1 | cut -d' ' -f3)" > "$dest/$out/load.txt"
echo "load before: $(cat /proc/loadavg)" >> "$dest/$out/load.txt"
"$client" 127.0.0.1:$port "$work/ca.pem" "$rate" "$secs" $broker > "$dest/$out/stdout.txt" 2> "$dest/$out/stderr.txt" \
  || echo "client exit $?" >> "$dest/$out/load.txt"
echo "load after: $(cat /proc/loadavg)" >> "$dest/$out/load.txt"
