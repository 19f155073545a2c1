#!/usr/bin/env bash
# Builds the JVM artifact of the SDK, dev.palaver:palaver-client-kotlin, with
# the native library inside the jar, runs its tests against a real
# palaver-gateway, and installs it into the local Maven repository
# (~/.m2), where apps (and client/samples/kotlin-chat) take it by
# coordinates.
#
#   tools/scripts/kotlin-sdk.sh            debug library, tests run
#   tools/scripts/kotlin-sdk.sh --release  release library, stripped (what
#                                          an app ships), tests run
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=debug
cargo_flags=()
if [ "${1:-}" = "--release" ]; then
  profile=release
  cargo_flags=(--release)
fi
# The tests start palaver-gateway and mint tokens with palaver (debug).
cargo build --quiet -p palaver-gateway -p palaver-tools
cargo build --quiet -p palaver-client --lib "${cargo_flags[@]}"
native=client/bindings/kotlin/target/native/linux-x86-64
mkdir -p "$native"
cp "target/$profile/libpalaver_client.so" "$native/"
if [ "$profile" = release ]; then
  strip "$native/libpalaver_client.so"
fi
mvn -B -ntp -Dstyle.color=never -f client/bindings/kotlin/pom.xml \
  -Dpalaver.target="$PWD/target/debug" install
ls -l client/bindings/kotlin/target/palaver-client-kotlin-*.jar \
  | awk '{print "kotlin-sdk: " $NF " (" $5 " bytes) installed as dev.palaver:palaver-client-kotlin"}'
