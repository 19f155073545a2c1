#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need
# (redis-server, Apache Kafka and Apache Cassandra from Maven Central) if
# missing, then runs every
# test in the workspace, then the client SDK's JVM artifact (built, tested,
# installed) and the sample app that depends on it, against a real
# palaver-gateway. The tests start their own Redis, Kafka and
# Cassandra and gateways on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# A one-shot build gains nothing from incremental state (GBs on disk).
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi
df -h . | tail -1 | awk '{print "== disk: " $4 " free before the build"}'

tools/scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --no-fail-fast
# The JVM SDK as app teams get it: dev.palaver:palaver-client-kotlin with the
# native library in the jar, its tests against a real palaver-gateway, then
# installed into ~/.m2; and the sample app that takes it by coordinates.
echo "== Kotlin SDK (client/bindings/kotlin: build, test, install)"
tools/scripts/kotlin-sdk.sh
echo "== Sample app (client/samples/kotlin-chat, SDK by Maven coordinates)"
mvn -B -ntp -Dstyle.color=never -f client/samples/kotlin-chat/pom.xml \
  -Dpalaver.target="$PWD/target/debug" test
du -sh target 2>/dev/null | awk '{print "== target/ after the run: " $1}'
