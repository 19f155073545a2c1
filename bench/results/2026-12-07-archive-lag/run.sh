#!/usr/bin/env bash
# usage: run.sh RATE [--no-archive]
# With KEEP=1 the cluster in $WORK/cluster is reused if it is up (JIT-warm
# JVMs: run a warm-up first) and left up afterwards.
# `palaver cluster up` (with Cassandra + palaver-archiver unless --no-archive),
# 1:1 chat at RATE msg/s for 20 s from 2,000 connections, CPU of each cluster
# process over 15 s of the steady phase, and the archiver's lag: the highest
# seq stored minus the highest seq archived, summed over the bench's
# conversations, sampled every second in Redis (c:{conv}:seq vs c:{conv}:arch).
set -euo pipefail
R=$1; shift || true
EXTRA="${1:-}"
ROOT=/work/main
BIN=$ROOT/target/release
WORK=${WORK:-/tmp/archive-lag}
if [ "${KEEP:-}" = 1 ] && [ -f "$WORK/cluster/state" ]; then
  cd "$WORK"
else
  rm -rf "$WORK"; mkdir -p "$WORK"; cd "$WORK"
  $BIN/palaver cluster --dir "$WORK/cluster" up --listen 127.0.0.1:7643 --data-dir "$WORK/.palaver" $EXTRA > up.log
  cat up.log
fi
redis_port=$(awk '$1=="redis"{print $3}' cluster/state)
pids=$(awk '{print $1":"$2}' cluster/state)
tick=$(getconf CLK_TCK)
snap() { for p in $pids; do n=${p%%:*}; pid=${p##*:}; awk -v n=$n '{print n, $14+$15}' /proc/$pid/stat; done; }
lag() {
  redis-cli -p "$redis_port" --no-auth-warning eval '
    local stored, archived = 0, 0
    local cursor = "0"
    repeat
      local r = redis.call("SCAN", cursor, "MATCH", "c:{*}:seq", "COUNT", 1000)
      cursor = r[1]
      for _, k in ipairs(r[2]) do
        stored = stored + tonumber(redis.call("GET", k))
        local a = redis.call("GET", string.sub(k, 1, -4) .. "arch")
        if a then archived = archived + tonumber(a) end
      end
    until cursor == "0"
    return {stored, archived}' 0 | paste -sd' '
}
$BIN/palaver-bench run $ROOT/bench/scenarios/chat-1to1.toml --target 127.0.0.1:7643 \
   --data-dir "$WORK/.palaver" --connections 2000 --rate "$R" --duration 20s --out "rate-$R" > "bench-$R.log" 2>&1 &
bp=$!
( for i in $(seq 1 60); do echo "$(date +%s) $(lag)"; sleep 1; done ) > "lag-$R.txt" &
lp=$!
sleep 8; snap > "cpu0-$R"; t0=$(date +%s.%N); sleep 15; snap > "cpu1-$R"; t1=$(date +%s.%N)
wait $bp || true
wait $lp || true
join "cpu0-$R" "cpu1-$R" | awk -v t=$(echo "$t1 - $t0" | bc) -v hz=$tick '{printf "%s %.1f%%\n", $1, ($3-$2)/hz/t*100}' > "cpu-$R.txt"
cat "cpu-$R.txt"
grep -E "acked|deliveries|e2e " "bench-$R.log" || tail -5 "bench-$R.log"
# lag: stored - archived over time
awk '{print $1, $2, $3, $2-$3}' "lag-$R.txt" | tail -45 > "lag-$R.tsv"
sort -k4 -n "lag-$R.tsv" | tail -1 | awk '{print "max lag (seqs stored, not yet archived):", $4}'
tail -1 "lag-$R.tsv" | awk '{print "at the end:", $4}'
[ "${KEEP:-}" = 1 ] || $BIN/palaver cluster --dir "$WORK/cluster" down > /dev/null
