#!/usr/bin/env bash
# The non-Python tools some tests drive, installed if missing (idempotent):
#   chromium        headless browser for the web-page test (Debian)
#   docker-compose  validates docker-compose.yml without a Docker engine (Debian)
#   kustomize       renders the k8s overlays to compare with ours (go install)
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

if command -v redis-server >/dev/null 2>&1; then
  echo "test-tools: redis-server already installed"
else
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  sudo_ apt-get install -y -qq --no-install-recommends redis-server
fi
