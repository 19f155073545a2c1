#!/usr/bin/env bash
# Quiet-window sequence: one-hop rounds, chat rates, loopback floor.
# Results into $OUT (a bench/results folder); binaries in /tmp/final/gw-{base,new,thread}
set -u
OUT=$1
cd "$OUT"
T=../2026-11-29-thread-per-core   # one-hop.sh, mosquitto.sh, run.sh
export OUT_DIR="$PWD"
for k in 1 2 3; do
  for v in base new; do $T/one-hop.sh /tmp/final/gw-$v 1 1000 20 one-hop-c1-$v-$k; done
  MQTT_ONE_HOP=/tmp/inline/mqtt-target/release/mqtt-one-hop $T/mosquitto.sh 1000 20 mosquitto-$k
done
for r in 20000 25000 35000; do for k in 1 2; do for v in base new thread; do
  $T/run.sh /tmp/final/gw-$v $r 15 $v-$r-$k
done; done; done
for r in 20000 35000; do
  echo "load before: $(cat /proc/loadavg)" > floor-$r.txt
  /work/main/target/release/examples/loopback_floor --connections 8000 --rate $r --seconds 10 >> floor-$r.txt
  echo "load after: $(cat /proc/loadavg)" >> floor-$r.txt
done
echo done > /tmp/final/embedded.done
