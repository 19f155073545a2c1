#!/usr/bin/env bash
# Starts N palaver-gateway processes sharing one port through SO_REUSEPORT
# (each with its own --gateway-id and admin port, all sharing one data dir for
# the dev certificate and JWT secret), and prints the --gateway-pid flags for
# palaver-bench. Stop them with: bench/local-gateways.sh stop DATA_DIR
# Each runs its own embedded engine in memory (--ephemeral): one durable
# store per data dir can have only one process.
#
#   bench/local-gateways.sh start N [LISTEN] [DATA_DIR] [extra gateway flags...]
#   bench/local-gateways.sh stop [DATA_DIR]
set -euo pipefail
cmd=${1:?usage: $0 start N [LISTEN] [DATA_DIR] [flags...] | stop [DATA_DIR]}
here=$(cd "$(dirname "$0")/.." && pwd)
gateway=${PALAVER_GATEWAY:-$here/target/release/palaver-gateway}
case "$cmd" in
start)
  n=${2:?how many gateway processes}
  listen=${3:-127.0.0.1:7443}
  data=${4:-.palaver}
  shift $(( $# < 4 ? $# : 4 ))
  mkdir -p "$data"
  host=${listen%:*}
  : > "$data/gateway.pids"
  for i in $(seq 1 "$n"); do
    "$gateway" --listen "$listen" --data-dir "$data" --cores 1 --gateway-id "gw$i" \
      --admin "$host:$((7500 + i))" --ephemeral "$@" > "$data/gw$i.log" 2>&1 &
    echo $! >> "$data/gateway.pids"
    # The first one writes the dev credentials; the others reuse them.
    if [ "$i" = 1 ]; then
      for _ in $(seq 100); do [ -s "$data/jwt-hs256.secret" ] && break; sleep 0.1; done
    fi
  done
  sleep 0.5
  sed 's/^/--gateway-pid /' "$data/gateway.pids" | tr '\n' ' '; echo
  ;;
stop)
  data=${2:-.palaver}
  [ -f "$data/gateway.pids" ] || { echo "no $data/gateway.pids" >&2; exit 1; }
  while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$data/gateway.pids"
  rm -f "$data/gateway.pids"
  ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
