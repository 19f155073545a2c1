#!/usr/bin/env bash
# usage: run-fanout.sh BIN WORK ; bench/scenarios/fanout-1000.toml (one 1000-member group, all
# online, 2 senders at 10 msg/s: 9,990 deliveries/s) through the running cluster in WORK,
# with the cluster processes' CPU sampled over 15 s of the steady phase.
set -euo pipefail
BIN=$1; WORK=$2
SCEN=$(cd "$(dirname "$0")/../../scenarios" && pwd)/fanout-1000.toml
cd "$WORK"
pids=$(awk '{print $1":"$2}' cluster/state)
tick=$(getconf CLK_TCK)
snap() { for p in $pids; do n=${p%%:*}; pid=${p##*:}; awk -v n=$n '{print n, $14+$15}' /proc/$pid/stat; done; }
echo "load before: $(cat /proc/loadavg)" > bench-fanout.log
"$BIN/palaver-bench" run "$SCEN" --target 127.0.0.1:7643 --data-dir "$WORK/.palaver" --out fanout >> bench-fanout.log 2>&1 &
bp=$!
sleep 10; snap > cpu0-fanout; t0=$(date +%s.%N); sleep 15; snap > cpu1-fanout; t1=$(date +%s.%N)
echo "load during: $(cat /proc/loadavg)" >> bench-fanout.log
wait $bp || true
join cpu0-fanout cpu1-fanout | awk -v t=$(echo "$t1 - $t0" | bc) -v hz=$tick \
  '{c=($3-$2)/hz; printf "%-9s %5.1f%% of a core  %7.1f us/delivery\n", $1, c/t*100, c/(t*9990)*1e6}' > cpu-fanout.txt
cat cpu-fanout.txt
grep -E "^load|  messages|  conversations|  deliveries|  e2e |  ack " bench-fanout.log
