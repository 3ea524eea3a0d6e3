#!/usr/bin/env bash
# The non-Python tools some tests drive, installed if missing (idempotent):
#   chromium        headless browser for the web-page test (Debian)
#   docker-compose  validates docker-compose.yml without a Docker engine (Debian)
#   kustomize       renders the k8s overlays to compare with ours (go install)
#   promtool        checks and unit-tests the Prometheus alert rules (Debian's prometheus
#                   package; only the promtool binary is unpacked, no server is installed)
#   otelcol         the OpenTelemetry Collector the trace tests send spans to (built with
#                   ocb from the Go module proxy: deploy/local/otelcol/build.sh)
#   redis-server    the shared rate-limit store the API tests start (Debian)
set -euo pipefail

sudo_() { if [[ $(id -u) -ne 0 ]]; then sudo "$@"; else "$@"; fi; }

if command -v chromium >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1; then
  echo "test-tools: chromium and docker-compose already installed"
else
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  sudo_ apt-get install -y -qq chromium docker-compose
fi

if command -v kubectl >/dev/null 2>&1 || command -v kustomize >/dev/null 2>&1 \
   || [[ -x "$HOME/go/bin/kustomize" ]]; then
  echo "test-tools: kustomize already available"
else
  command -v go >/dev/null 2>&1 || { echo "test-tools: Go is needed to build kustomize" >&2; exit 1; }
  go install sigs.k8s.io/kustomize/kustomize/v5@v5.7.1
fi

if command -v promtool >/dev/null 2>&1; then
  echo "test-tools: promtool already installed"
else
  deb_dir=$(mktemp -d)
  (cd "$deb_dir" && { apt-get download -qq prometheus 2>/dev/null \
     || { sudo_ apt-get update -qq && apt-get download -qq prometheus; }; })
  dpkg-deb --fsys-tarfile "$deb_dir"/prometheus_*.deb | tar -xO ./usr/bin/promtool >"$deb_dir/promtool"
  sudo_ install -m 0755 "$deb_dir/promtool" /usr/local/bin/promtool
  rm -rf "$deb_dir"
  promtool --version | head -1
fi

"$(dirname "${BASH_SOURCE[0]}")/otelcol/build.sh" >/dev/null

if command -v redis-server >/dev/null 2>&1; then
  echo "test-tools: redis-server already installed"
else
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  sudo_ apt-get install -y -qq --no-install-recommends redis-server
fi
