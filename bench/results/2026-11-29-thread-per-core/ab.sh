#!/usr/bin/env bash
# Alternates the gateway binaries $GW_DIR/gw-<v> for v in $VARIANTS
# (default "base new"; gw-thread is a wrapper: exec gw-new --engine-thread "$@"):
#   ab.sh chat "RATES" RUNS [FIRST_RUN_NUMBER]       chat-1to1, --cores 2, 15 s
#   ab.sh one-hop "CORES" RUNS [FIRST_RUN_NUMBER]    one-hop at 1,000/s, 20 s
set -u
here=$(cd "$(dirname "$0")" && pwd)
kind=$1; first=${4:-1}
for x in $2; do for k in $(seq $first $((first + $3 - 1))); do
  for v in ${VARIANTS:-base new}; do
    if [ "$kind" = chat ]; then
      "$here/run.sh" "${GW_DIR:-/tmp}/gw-$v" $x 15 $v-$x-$k
    else
      "$here/one-hop.sh" "${GW_DIR:-/tmp}/gw-$v" $x 1000 20 one-hop-c$x-$v-$k
    fi
  done
done; done
