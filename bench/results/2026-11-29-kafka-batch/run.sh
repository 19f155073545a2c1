#!/usr/bin/env bash
# usage: run.sh BIN WORK RATE [DURATION]
#   BIN:  directory holding palaver, palaver-router, palaver-gateway, palaver-bench (release)
#   WORK: directory of a running `$BIN/palaver cluster --dir $WORK/cluster up --listen 127.0.0.1:7643
#         --data-dir $WORK/.palaver`
# Runs the 1:1 chat scenario at RATE msg/s through the cluster and samples every cluster
# process's CPU (utime+stime from /proc/<pid>/stat) over 15 s of the steady phase; prints
# CPU % of one core and CPU µs per message (CPU time / messages sent in the window).
set -euo pipefail
BIN=$1; WORK=$2; R=$3; D=${4:-20s}
SCEN=$(cd "$(dirname "$0")/../../scenarios" && pwd)/chat-1to1.toml
cd "$WORK"
pids=$(awk '{print $1":"$2}' cluster/state)
tick=$(getconf CLK_TCK)
snap() { for p in $pids; do n=${p%%:*}; pid=${p##*:}; awk -v n=$n '{print n, $14+$15}' /proc/$pid/stat; done; }
echo "load before: $(cat /proc/loadavg)" > bench-$R.log
"$BIN/palaver-bench" run "$SCEN" --target 127.0.0.1:7643 \
   --data-dir "$WORK/.palaver" --connections 2000 --rate "$R" --duration "$D" --out "rate-$R" >> bench-$R.log 2>&1 &
bp=$!
# the steady phase: connects take ~5 s
sleep 8; snap > cpu0-$R; t0=$(date +%s.%N); sleep 15; snap > cpu1-$R; t1=$(date +%s.%N)
echo "load during: $(cat /proc/loadavg)" >> bench-$R.log
wait $bp || true
join cpu0-$R cpu1-$R | awk -v t=$(echo "$t1 - $t0" | bc) -v hz=$tick -v r=$R \
  '{c=($3-$2)/hz; printf "%-9s %5.1f%% of a core  %7.1f us/msg\n", $1, c/t*100, c/(t*r)*1e6}' > cpu-$R.txt
cat cpu-$R.txt
grep -E "load|p50|p99|lost|dup|order|acked|deliver" bench-$R.log | head -20
