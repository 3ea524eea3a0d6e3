#!/usr/bin/env bash
# Build (once) the OpenTelemetry Collector that the trace tests send spans to, and print
# its path.
#
# builder-config.yaml names the components (OTLP receiver, file exporter); the
# OpenTelemetry Collector Builder (ocb, `go run` from the Go module proxy) generates the
# distribution and compiles it. The binary is cached in $QRSIGHT_OTELCOL_HOME (default:
# <repo>/.kafka/otelcol, git-ignored) and rebuilt only when builder-config.yaml changes.
# A cold build (empty Go module and build caches) fetches ~500 MB of Go modules (unpacked)
# and takes about 4 CPU-minutes: 2-3 minutes on two idle cores, 9 minutes measured on two
# cores shared with a load of 12; a rebuild with warm Go caches about 15 s; a cached binary
# returns at once.
#
# Usage: deploy/local/otelcol/build.sh      (needs Go 1.26+ on PATH)
set -euo pipefail

OCB_VERSION=v0.161.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../../.." && pwd)
home=${QRSIGHT_OTELCOL_HOME:-$root/.kafka/otelcol}
binary=$home/qrsight-otelcol

stamp() { (cat "$here/builder-config.yaml"; echo "$OCB_VERSION") | sha256sum | cut -c1-16; }
built() { [[ -x $binary && -f $home/stamp && $(cat "$home/stamp") == "$(stamp)" ]]; }

if built; then echo "$binary"; exit 0; fi
command -v go >/dev/null || { echo "build.sh: go not found on PATH (Go 1.26+ builds the collector)" >&2; exit 1; }

mkdir -p "$home"
exec 9>"$home/build.lock"
flock 9
if built; then echo "$binary"; exit 0; fi

build=$home/build
rm -rf "$build"
mkdir -p "$build"
cp "$here/builder-config.yaml" "$build/"
echo "build.sh: building the OpenTelemetry Collector with ocb $OCB_VERSION (log: $home/build.log)" >&2
start=$SECONDS
if ! (cd "$build" && GOFLAGS=-buildvcs=false go run "go.opentelemetry.io/collector/cmd/builder@$OCB_VERSION" \
        --config builder-config.yaml --ldflags="-s -w") >"$home/build.log" 2>&1; then
  tail -30 "$home/build.log" >&2
  echo "build.sh: the collector build failed (full log: $home/build.log)" >&2
  exit 1
fi
mv "$build/out/qrsight-otelcol" "$binary.new"
mv "$binary.new" "$binary"
stamp >"$home/stamp"
rm -rf "$build"
echo "build.sh: built $binary in $((SECONDS - start)) s" >&2
echo "$binary"
