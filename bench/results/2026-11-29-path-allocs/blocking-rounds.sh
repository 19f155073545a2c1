#!/usr/bin/env bash
# Same-client one-hop: Palaver before/after (/tmp/final/gw-base, gw-new; --cores 1)
# and mosquitto, each with mqtt-one-hop, alternated; rounds FIRST..LAST.
here=$(cd "$(dirname "$0")" && pwd)
export MQTT_ONE_HOP=${MQTT_ONE_HOP:-/tmp/inline/mqtt-target/release/mqtt-one-hop}
for k in $(seq $1 $2); do
  for v in base new; do "$here/palaver-blocking.sh" /tmp/final/gw-$v 1000 20 blocking-$v-$k; done
  OUT_DIR="$here" "$here/../2026-11-29-thread-per-core/mosquitto.sh" 1000 20 blocking-mosquitto-$k
done
