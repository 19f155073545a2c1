#!/usr/bin/env bash
# Instructions per Send on the router's batch path and the embedded path,
# counted by callgrind (exact: the machine's load does not change them).
# Every scenario of router/examples/instructions_per_message.rs, one
# callgrind run each; prints a markdown table. Takes a few minutes.
#
#   bench/scripts/instructions.sh [out.md]
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt install valgrind)" >&2; exit 1; }
cargo build --release --quiet -p palaver-router --example instructions_per_message
bin=target/release/examples/instructions_per_message
out=${1:-/dev/stdout}
{
  echo "instructions per Send (callgrind, $(git rev-parse --short HEAD), $(valgrind --version))"
  echo
  echo "| path   | conversation | batch | instructions/Send |"
  echo "| ------ | ------------ | ----: | ----------------: |"
  for path in router engine; do
    for case in "dm online" "dm offline" "group 20"; do
      for batch in 1 64; do
        log=$(mktemp)
        sends=$(valgrind --tool=callgrind --collect-atstart=no \
          --toggle-collect='*counted_*' --callgrind-out-file=/dev/null \
          "$bin" "$path" "$case" "$batch" 2>"$log" | sed -n 's/^sends=//p')
        collected=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$log")
        rm -f "$log"
        printf '| %-6s | %-12s | %5s | %17s |\n' "$path" "$case" "$batch" \
          "$(( collected / sends ))"
      done
    done
  done
} > "$out"
