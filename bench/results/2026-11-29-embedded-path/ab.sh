#!/usr/bin/env bash
# Alternates the base and new gateway binaries ($GW_DIR/gw-base, $GW_DIR/gw-new):
#   ab.sh "RATES" RUNS [chat|one-hop] [FIRST_RUN_NUMBER]
set -u
here=$(cd "$(dirname "$0")" && pwd)
kind=${3:-chat}
first=${4:-1}
for r in $1; do for k in $(seq $first $((first + $2 - 1))); do
  for v in base new; do
    if [ "$kind" = chat ]; then
      "$here/run.sh" "${GW_DIR:-/tmp}/gw-$v" $r 15 $v-$r-$k
    else
      "$here/one-hop.sh" "${GW_DIR:-/tmp}/gw-$v" $r 20 one-hop-$v-$r-$k
    fi
  done
done; done
