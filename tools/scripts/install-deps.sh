#!/usr/bin/env bash
# Installs what Palaver's tests and local stack need and a fresh machine lacks:
#   - redis-server (Debian package)
#   - tansu, a Kafka-API-compatible broker (crates.io; ~10-16 min to build on 2 cores)
# Idempotent: anything already present is left alone.
set -euo pipefail

TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$CARGO_BIN:$PATH"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1; then
  echo "install-deps: installing redis-server (apt)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
  # The package starts a system instance on 6379; ours run on their own ports.
  as_root systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

if ! command -v tansu >/dev/null 2>&1; then
  echo "install-deps: building tansu $TANSU_VERSION (cargo install; this takes 10-16 minutes on 2 cores)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql
fi

echo "install-deps: redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p'), $(tansu --version 2>/dev/null || echo tansu)"
