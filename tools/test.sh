#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need
# (redis-server, Apache Kafka from Maven Central) if missing, then runs every
# test in the workspace, then the client SDK's Kotlin tests on the JVM
# against a real palaver-gateway. The tests start their own Redis, Kafka and
# gateways on free loopback ports.
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
# cargo test built libpalaver_client.so, palaver-gateway and palaver (debug);
# the build below only makes sure of it.
echo "== Kotlin SDK tests (client/bindings/kotlin, JVM + JNA, real gateway)"
cargo build --quiet -p palaver-client -p palaver-gateway -p palaver-tools
mvn -B -ntp -Dstyle.color=never -f client/bindings/kotlin/pom.xml \
  -Dpalaver.target="$PWD/target/debug" test
