#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need
# (redis-server, Apache Kafka from Maven Central) if missing, then runs every
# test in the workspace. The tests start their own Redis and Kafka instances
# on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

tools/scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --no-fail-fast
