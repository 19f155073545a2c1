#!/usr/bin/env bash
# Alternates palaver before (gw-base: 44a992c, SendAck first) / after
# (gw-new: b7a14b2, Delivers first) with --cores 1, and mosquitto, ROUNDS times.
#   GW_DIR=/tmp/oh MQTT_ONE_HOP=... round.sh FIRST LAST
here=$(cd "$(dirname "$0")" && pwd)
tpc="$here/../2026-11-29-thread-per-core"   # one-hop.sh and mosquitto.sh live there
export OUT_DIR="$here"
for k in $(seq $1 $2); do
  for v in base new; do "$tpc/one-hop.sh" "$GW_DIR/gw-$v" 1 1000 20 one-hop-c1-$v-$k; done
  "$tpc/mosquitto.sh" 1000 20 mosquitto-$k
done
