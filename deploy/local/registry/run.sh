#!/usr/bin/env bash
# Run the schema registry that fetch.sh builds, in the foreground, on 127.0.0.1:PORT.
# Its Confluent-compatible API (what QRSIGHT_SCHEMA_REGISTRY_URL points at) is
#   http://127.0.0.1:PORT/apis/ccompat/v7
# Storage is in memory: schemas are gone when it stops.
#
# Usage: deploy/local/registry/run.sh [PORT]     (default 8081)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
port=${1:-8081}
jar=$("$here/fetch.sh")
exec java -Xms64m -Xmx384m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
  -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$port" \
  -Dquarkus.log.level=WARN -Dquarkus.log.category.\"io.quarkus\".level=INFO \
  -jar "$jar"
