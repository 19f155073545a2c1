#!/usr/bin/env bash
# Installs what Palaver's tests and local stack need and a fresh machine lacks:
#   - redis-server (Debian package)
#   - Maven (Debian package), for Kafka below and the client SDK's Kotlin
#     tests (client/bindings/kotlin: Kotlin compiler, JNA, JUnit come from
#     Maven Central on their first run)
#   - Apache Kafka (broker, KRaft) from Maven Central: org.apache.kafka:kafka_2.13
#     and its runtime dependencies, copied by Maven from tools/kafka/pom.xml into
#     ~/.cache/palaver/kafka-<version>/libs (run as `java -cp 'libs/*' kafka.Kafka`
#     by stack/src/kafka.rs). Needs a JDK >= 17 (`java`) and Maven (`mvn`).
#   - Apache Cassandra (the history archive) from Maven Central:
#     org.apache.cassandra:cassandra-all and its runtime dependencies, copied
#     from tools/cassandra/pom.xml into ~/.cache/palaver/cassandra-<version>/libs
#     (run by stack/src/cassandra.rs).
# Idempotent: anything already present is left alone.
set -euo pipefail

# Keep in step with KAFKA_VERSION in stack/src/kafka.rs and tools/kafka/pom.xml.
KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
CASSANDRA_VERSION="${CASSANDRA_VERSION:-5.0.6}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/palaver/kafka-$KAFKA_VERSION"
LIBS="${PALAVER_KAFKA_LIBS:-$CACHE/libs}"
CASSANDRA_LIBS="${PALAVER_CASSANDRA_LIBS:-${XDG_CACHE_HOME:-$HOME/.cache}/palaver/cassandra-$CASSANDRA_VERSION/libs}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1; then
  echo "install-deps: installing redis-server (apt)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
  # The package starts a system instance on 6379; ours run on their own ports.
  as_root systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

if ! command -v mvn >/dev/null 2>&1; then
  echo "install-deps: installing maven (apt)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq maven >/dev/null
fi

# Kafka 4.x brokers need Java 17 or newer.
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
if ! command -v "$JAVA" >/dev/null 2>&1; then
  echo "install-deps: no java found (need a JDK >= 17 on PATH or in JAVA_HOME)" >&2
  exit 1
fi
JAVA_MAJOR="$("$JAVA" -XshowSettings:properties -version 2>&1 \
  | sed -n 's/^ *java\.specification\.version = \([0-9]*\).*/\1/p')"
if [ -z "$JAVA_MAJOR" ] || [ "$JAVA_MAJOR" -lt 17 ]; then
  echo "install-deps: $JAVA is Java ${JAVA_MAJOR:-?}; Apache Kafka $KAFKA_VERSION needs Java >= 17" >&2
  exit 1
fi

if [ ! -f "$LIBS/.complete" ]; then
  if ! command -v mvn >/dev/null 2>&1; then
    echo "install-deps: Maven (mvn) is needed to fetch Apache Kafka from Maven Central" >&2
    exit 1
  fi
  echo "install-deps: fetching Apache Kafka $KAFKA_VERSION (org.apache.kafka:kafka_2.13) from Maven Central into $LIBS"
  rm -rf "$LIBS.tmp"
  mkdir -p "$(dirname "$LIBS")"
  mvn -q -B -Dstyle.color=never -f "$HERE/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp"
  ls "$LIBS.tmp"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null
  touch "$LIBS.tmp/.complete"
  rm -rf "$LIBS"
  mv "$LIBS.tmp" "$LIBS"
fi

if [ ! -f "$CASSANDRA_LIBS/.complete" ]; then
  echo "install-deps: fetching Apache Cassandra $CASSANDRA_VERSION (org.apache.cassandra:cassandra-all) from Maven Central into $CASSANDRA_LIBS"
  rm -rf "$CASSANDRA_LIBS.tmp"
  mkdir -p "$(dirname "$CASSANDRA_LIBS")"
  mvn -q -B -Dstyle.color=never -f "$HERE/cassandra/pom.xml" -Dcassandra.version="$CASSANDRA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$CASSANDRA_LIBS.tmp"
  ls "$CASSANDRA_LIBS.tmp"/cassandra-all-"$CASSANDRA_VERSION".jar >/dev/null
  touch "$CASSANDRA_LIBS.tmp/.complete"
  rm -rf "$CASSANDRA_LIBS"
  mv "$CASSANDRA_LIBS.tmp" "$CASSANDRA_LIBS"
fi

echo "install-deps: redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')," \
  "Apache Kafka $KAFKA_VERSION ($(ls "$LIBS"/*.jar | wc -l) jars in $LIBS)," \
  "Apache Cassandra $CASSANDRA_VERSION ($(ls "$CASSANDRA_LIBS"/*.jar | wc -l) jars in $CASSANDRA_LIBS), Java $JAVA_MAJOR"
