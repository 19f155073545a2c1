#!/usr/bin/env bash
# Regenerates the checked-in UniFFI bindings of palaver-client from the built
# cdylib (library mode): client/bindings/kotlin/src/main/kotlin (Kotlin) and
# client/bindings/swift (Swift). Run it after changing the client's exported
# API; `cargo test -p palaver-client --test bindings` fails until you do.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p palaver-client --lib
cargo build -q -p palaver-client-bindgen --bins
case "$(uname -s)" in Darwin) LIB=target/debug/libpalaver_client.dylib ;; *) LIB=target/debug/libpalaver_client.so ;; esac
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for lang in kotlin swift; do
  target/debug/uniffi-bindgen generate --no-format --library "$LIB" --language "$lang" --out-dir "$OUT/$lang" >/dev/null
done
rm -rf client/bindings/kotlin/src/main/kotlin
rm -f client/bindings/swift/*.swift client/bindings/swift/*.h client/bindings/swift/*.modulemap
mkdir -p client/bindings/kotlin/src/main/kotlin client/bindings/swift
cp -r "$OUT/kotlin/." client/bindings/kotlin/src/main/kotlin/
cp -r "$OUT/swift/." client/bindings/swift/
echo "bindings regenerated: client/bindings/kotlin/src/main/kotlin, client/bindings/swift"
