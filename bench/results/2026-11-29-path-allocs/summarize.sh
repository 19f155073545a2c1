#!/usr/bin/env bash
# One line per chat run: rate, variant, e2e p50/p99/p99.9 (ms), gateway and bench CPU per sent message, acked/s, losses, load before.
for d in ${@:-base-* new-* thread-*}; do
  [ -f $d/stdout.txt ] || continue
  e2e=$(grep -E '^  e2e' $d/stdout.txt | awk '{print $4" / "$6" / "$7}')
  gw=$(grep -E 'CPU connected' $d/stdout.txt | sed 's/.*per sent message //')
  bench=$(grep -E 'bench CPU' $d/stdout.txt | sed 's/.*message //; s/ (.*//')
  acked=$(grep -o 'acked [0-9]* ([0-9]*/s)' $d/stdout.txt | sed 's/.*(//; s/)//')
  loss=$(grep -o 'losses [0-9]*' $d/stdout.txt)
  load=$(grep 'load before' $d/load.txt | cut -d' ' -f3)
  echo "$d | $e2e | gw $gw | bench $bench | $acked | $loss | load $load"
done
