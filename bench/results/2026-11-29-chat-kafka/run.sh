#!/usr/bin/env bash
# usage: run.sh RATE ; runs the bench at RATE msg/s and samples CPU of the cluster's processes
set -euo pipefail
R=$1
cd $WORK
pids=$(awk '{print $1":"$2}' cluster/state)
tick=$(getconf CLK_TCK)
snap() { for p in $pids; do n=${p%%:*}; pid=${p##*:}; awk -v n=$n '{print n, $14+$15}' /proc/$pid/stat; done; }
/work/main/target/release/palaver-bench run /work/main/bench/scenarios/chat-1to1.toml --target 127.0.0.1:7643 \
   --data-dir $WORK/.palaver --connections 2000 --rate $R --duration 20s --out rate-$R > bench-$R.log 2>&1 &
bp=$!
# measure CPU during the steady 20 s window: wait for connects (~5 s)
sleep 8; snap > cpu0-$R; t0=$(date +%s.%N); sleep 15; snap > cpu1-$R; t1=$(date +%s.%N)
wait $bp || true
join cpu0-$R cpu1-$R | awk -v t=$(echo "$t1 - $t0" | bc) -v hz=$tick '{printf "%s %.1f%%\n", $1, ($3-$2)/hz/t*100}' > cpu-$R.txt
cat cpu-$R.txt
