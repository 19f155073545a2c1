#!/usr/bin/env bash
# One channel through `palaver cluster` (Kafka, Redis, a router, two
# gateways sharing one port): MEMBERS members, CONNECTED of them connected
# with the channel LIVE, 2 senders, RATE channel messages/s for SECONDS s.
# Usage: run.sh MEMBERS CONNECTED RATE SECONDS OUT
# (from the repository root, after `cargo build --release --workspace`).
set -euo pipefail
MEMBERS=$1 CONNECTED=$2 RATE=$3 SECONDS_=$4 OUT=$5
WORK=$(mktemp -d /tmp/pv-channel.XXXX)
target/release/palaver cluster up --dir "$WORK/cluster" --data-dir "$WORK/data" \
  --listen 127.0.0.1:7643 --no-archive > "$WORK/up.txt"
# "gw1       pid 1234     port 7643"
PIDS=$(awk '$1 ~ /^gw[12]$/ {print $3}' "$WORK/up.txt")
GWFLAGS=""
for p in $PIDS; do GWFLAGS="$GWFLAGS --gateway-pid $p"; done
uptime
flock -o /tmp/palaver-bench.lock target/release/palaver-bench run --scenario channel \
  --channel-members "$MEMBERS" --connections "$CONNECTED" --senders 2 \
  --rate "$RATE" --duration "${SECONDS_}s" --grace 10s --workers 2 \
  --target 127.0.0.1:7643 --data-dir "$WORK/data" $GWFLAGS --out "$OUT" || true
uptime
target/release/palaver cluster down --dir "$WORK/cluster" > /dev/null
cat "$WORK/up.txt"
