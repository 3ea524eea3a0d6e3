#!/usr/bin/env bash
# Containers on a machine with no Docker engine and no image registry (this project's dev
# machines and CI): Debian's podman builds the project's Dockerfiles and runs its
# docker-compose.yml unchanged, through docker-compose talking to podman's Docker API.
#
#   deploy/local/containers.sh setup       install podman, runc, netavark, debootstrap and
#                                          docker-compose from Debian; configure podman (once)
#   deploy/local/containers.sh bases       build local stand-ins for the base images the
#                                          Dockerfiles and the compose file name (see below)
#   deploy/local/containers.sh build       build the CPU image (deploy/docker/Dockerfile)
#   deploy/local/containers.sh build-cuda  build the CUDA image (deploy/docker/Dockerfile.cuda)
#   deploy/local/containers.sh prepare     setup + bases + build
#   deploy/local/containers.sh up [SVC..]  start the compose stack (every service whose image
#                                          is here) and print where it answers
#   deploy/local/containers.sh down        stop it and remove its containers, network and
#                                          volumes (fails if any is left)
#   deploy/local/containers.sh compose ... docker-compose on the running stack (ps, logs, ...)
#   deploy/local/containers.sh clean       remove the images built here (stand-ins included)
#
# Stand-ins: no registry is reachable here, so `bases` builds each base image from Debian's
# (and Ubuntu's) packages and tags it with the very name the project's files use:
#   python:3.11.x-slim-bookworm   Debian bookworm's Python 3.11 (images/python)
#   apache/kafka:4.x              Debian + OpenJDK 17 + that Kafka version's jars from Maven
#                                 Central, with the published image's start-up (images/kafka)
#   prom/prometheus:v3.x          Debian's Prometheus 2.42 (images/prometheus)
#   nvidia/cuda:12.x-...-ubuntu24.04
#                                 plain Ubuntu 24.04 (debootstrap): no CUDA or cuDNN libraries,
#                                 enough to build the CUDA image and run it on the CPU provider
# Every stand-in carries the label io.qrsight.stand-in; an image of that name that does not
# (a real one, pulled where a registry is reachable) is used as it is. grafana/grafana has no
# stand-in: `up` leaves Grafana out when its image is missing.
#
# Environment (all optional):
#   COMPOSE_PROJECT_NAME   compose project (default qrsight): containers, network and volumes
#                          are named after it
#   KAFKA_HOST_PORT, API_HOST_PORT, PROMETHEUS_HOST_PORT, GRAFANA_HOST_PORT
#                          host ports docker-compose.yml publishes (9092, 8000, 9090, 3000)
#   QRSIGHT_CONTAINERS_RUN state of running stacks: podman's API socket, pids, logs
#                          (default /tmp/qrsight-containers)
#   DEBIAN_MIRROR, UBUNTU_MIRROR  package mirrors for the stand-ins (deb.debian.org,
#                          archive.ubuntu.com)
# Builds run with --network host and get this machine's pip settings (index, proxy CA) as
# build secrets (`pip config list`), never stored in an image.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/deploy/local"
IMAGES="$HERE/images"
PYTHON="${PYTHON:-python3}"
PROJECT="${COMPOSE_PROJECT_NAME:-qrsight}"
RUN_BASE="${QRSIGHT_CONTAINERS_RUN:-/tmp/qrsight-containers}"
RUN_DIR="$RUN_BASE/$PROJECT"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
UBUNTU_MIRROR="${UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}"
DEBIAN_BASE=localhost/qrsight-standin/debian:bookworm
STANDIN_LABEL=io.qrsight.stand-in
RECIPE_LABEL=io.qrsight.stand-in.recipe
# Ubuntu's archive keyring (for debootstrap of the CUDA stand-in), pinned by its hash.
UBUNTU_KEYRING_DEB=pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb
UBUNTU_KEYRING_SHA256=36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8
# Podman 4.3 runs HEALTHCHECKs from systemd timers; without systemd (containers, CI) the
# health ticker below runs them, so podman must not try.
export DISABLE_HC_SYSTEMD=true

say() { echo "containers: $*"; }
die() { echo "containers: error: $*" >&2; exit 1; }
sudo_() { if [[ $(id -u) -ne 0 ]]; then sudo "$@"; else "$@"; fi; }

# ---------------------------------------------------------------------------- names
# The image names come from the project's files, so a bumped tag needs no edit here.
names() {  # prints KEY=image lines: python, cuda, kafka, prometheus, grafana, qrsight, qrsight_cuda
  "$PYTHON" - "$ROOT" <<'EOF'
import re, sys
from pathlib import Path
import yaml
root = Path(sys.argv[1])
cpu = (root / "deploy/docker/Dockerfile").read_text()
cuda = (root / "deploy/docker/Dockerfile.cuda").read_text()
services = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
print("python=" + re.search(r"^FROM\s+(\S+)\s+AS\s+build", cpu, re.M | re.I).group(1))
print("cuda=" + re.search(r"^ARG\s+CUDA_IMAGE=(\S+)", cuda, re.M).group(1))
for key, service in (("kafka", "kafka"), ("prometheus", "prometheus"), ("grafana", "grafana"),
                     ("qrsight", "api"), ("qrsight_cuda", "consumer-gpu")):
    print(f"{key}={services[service]['image']}")
EOF
}

image_name() {  # $1 = key
  names | sed -n "s/^$1=//p"
}

qualified() {  # Docker's short-name rule: python:3 -> docker.io/library/python:3
  local name="$1" first="${1%%/*}"
  if [[ "$name" != */* ]]; then
    echo "docker.io/library/$name"
  elif [[ "$first" == *.* || "$first" == *:* || "$first" == localhost ]]; then
    echo "$name"
  else
    echo "docker.io/$name"
  fi
}

# ---------------------------------------------------------------------------- setup
setup() {
  local want=() pkg
  for pkg in podman runc netavark aardvark-dns catatonit iptables uidmap debootstrap curl \
             docker-compose; do
    dpkg -s "$pkg" >/dev/null 2>&1 || want+=("$pkg")
  done
  if ! command -v mvn >/dev/null 2>&1 && [[ ! -x "$ROOT/.kafka/maven/bin/mvn" ]]; then
    want+=(maven)
  fi
  if ((${#want[@]})); then
    say "installing from Debian: ${want[*]}"
    export DEBIAN_FRONTEND=noninteractive
    sudo_ apt-get update -qq
    sudo_ apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${want[@]}"
  else
    say "podman, runc, netavark, debootstrap and docker-compose already installed"
  fi
  configure_podman
}

configure_podman() {
  # runc (crun is not installed); container ulimits no higher than this machine allows (the
  # defaults ask for more, which runc may not set without CAP_SYS_RESOURCE); logs and events
  # in files (no journald); Docker's short names (python:3.11 means docker.io/library/...).
  local nofile conf=/etc/containers/containers.conf.d/50-qrsight.conf
  nofile="$(ulimit -Hn)"
  [[ "$nofile" =~ ^[0-9]+$ ]] || nofile=65536
  ((nofile > 1048576)) && nofile=1048576
  sudo_ mkdir -p /etc/containers/containers.conf.d /etc/containers/registries.conf.d
  sudo_ tee "$conf" >/dev/null <<EOF
# Written by qrsight's deploy/local/containers.sh.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=4096:4096"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
events_logger = "file"
EOF
  sudo_ tee /etc/containers/registries.conf.d/50-qrsight.conf >/dev/null <<'EOF'
# Written by qrsight's deploy/local/containers.sh: short names resolve as with Docker.
unqualified-search-registries = ["docker.io"]
EOF
  podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.NetworkBackend}}' >/dev/null \
    || die "podman does not run; see 'podman info'"
  say "podman $(podman version --format '{{.Client.Version}}') configured ($conf)"
}

# ---------------------------------------------------------------------------- stand-ins
recipe_hash() {  # a hash of the files a stand-in is built from, plus extra words
  local dir="$1"
  shift
  { [[ -d "$dir" ]] && find "$dir" -type f -print0 | sort -z | xargs -0 sha256sum | cut -c1-64
    echo "$*"; } | sha256sum | cut -c1-16
}

label() {  # $1 = image, $2 = label name: its value, empty if none
  podman image inspect --format "{{index .Labels \"$2\"}}" "$1" 2>/dev/null | sed 's/^<no value>$//'
}

needs_build() {  # $1 = image, $2 = recipe hash: true if missing or a stand-in of another recipe
  local image="$1" hash="$2"
  podman image exists "$image" || return 0
  [[ -n "$(label "$image" "$STANDIN_LABEL")" ]] || return 1  # a real image: use it
  [[ "$(label "$image" "$RECIPE_LABEL")" != "$hash" ]]
}

bootstrap_import() {  # $1 = image, $2 = suite, $3 = mirror, $4.. = options: the root fs as an image
  local image="$1" suite="$2" mirror="$3" tmp start=$SECONDS
  shift 3
  tmp="$(mktemp -d /var/tmp/qrsight-rootfs.XXXXXX)"
  say "debootstrap $suite from $mirror (about a minute)"
  # debootstrap 1.0.128 (bookworm) predates Ubuntu noble: its gutsy script serves them all
  local script=()
  [[ -f "/usr/share/debootstrap/scripts/$suite" ]] || script=(/usr/share/debootstrap/scripts/gutsy)
  if ! debootstrap --variant=minbase "$@" "$suite" "$tmp/root" "$mirror" "${script[@]}" \
      >"$tmp/debootstrap.log" 2>&1; then
    tail -n 20 "$tmp/debootstrap.log" >&2
    rm -rf "$tmp"
    die "debootstrap failed"
  fi
  configure_rootfs "$tmp/root"
  tar -C "$tmp/root" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' --quiet - "$image" >/dev/null
  rm -rf "$tmp"
  say "$image imported in $((SECONDS - start)) s"
}

configure_rootfs() {  # what the published debian/ubuntu images set up besides the packages
  local root="$1"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  printf 'APT::Install-Recommends "false";\n' >"$root/etc/apt/apt.conf.d/90qrsight-standin"
}

build_standin() {  # $1 = image, $2 = context dir, $3 = recipe hash, $4.. = podman build args
  local image="$1" context="$2" hash="$3" start=$SECONDS
  shift 3
  say "building stand-in $image"
  podman build --quiet --format docker --network host --pull=never \
    --label "$RECIPE_LABEL=$hash" "$@" -t "$(qualified "$image")" "$context" >/dev/null
  say "$image built in $((SECONDS - start)) s"
}

standin_hash() {  # $1 = python | kafka | prometheus
  case "$1" in
    kafka) recipe_hash "$IMAGES/kafka" "$(image_name kafka)" ;;
    *) recipe_hash "$IMAGES/$1" ;;
  esac
}

standin_needed() {  # $1 = python | kafka | prometheus
  needs_build "$(qualified "$(image_name "$1")")" "$(standin_hash "$1")"
}

standin() {  # $1 = python | kafka | prometheus: its stand-in, if it needs building
  standin_needed "$1" || return 0
  case "$1" in
    kafka) kafka_standin "$(image_name kafka)" "$(standin_hash kafka)" ;;
    *) build_standin "$(image_name "$1")" "$IMAGES/$1" "$(standin_hash "$1")" ;;
  esac
}

standin_then() {  # $1 = stand-in, $2 = a command to run once it is there
  standin "$1"
  [[ -z "${2:-}" ]] || "$2"
}

parallel() {  # runs each argument (a command line) in the background; fails if one fails
  local pids=() i rc=0
  for i in "$@"; do
    # shellcheck disable=SC2086
    $i &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "containers: error: '${*:i+1:1}' failed" >&2; rc=1; }
  done
  return "$rc"
}

# Where a job waits on the network (debootstrap, apt, Maven, pip), the others go on: the
# Kafka jars resolve during debootstrap, then the stand-ins build side by side (and the
# qrsight image as soon as its Python base is there).
bases() {  # $1 = a command to run once the Python stand-in is there (prepare: build)
  local after="${1:-}" need=() key jars=""
  for key in python kafka prometheus; do
    standin_needed "$key" && need+=("$key")
  done
  if ((${#need[@]} == 0)); then
    say "base images present: $(image_name python), $(image_name kafka), $(image_name prometheus)"
    [[ -z "$after" ]] || "$after"
    return
  fi
  if [[ " ${need[*]} " == *" kafka "* ]]; then
    kafka_jars_for "$(image_name kafka)" &
    jars=$!
  fi
  ensure_debian_base
  [[ -z "$jars" ]] || wait "$jars" || die "could not fetch the Kafka jars"
  parallel "standin_then python $after" "standin kafka" "standin prometheus"
}

ensure_debian_base() {
  podman image exists "$DEBIAN_BASE" && return 0
  local tmp
  bootstrap_import "$DEBIAN_BASE" bookworm "$DEBIAN_MIRROR"
  # the published debian image's sources: the release, its updates and security updates
  tmp="$(mktemp -d)"
  cat >"$tmp/Containerfile" <<EOF
FROM $DEBIAN_BASE
RUN rm -f /etc/apt/sources.list && printf '%s\n' \\
      'Types: deb' 'URIs: ${DEBIAN_MIRROR}' 'Suites: bookworm bookworm-updates' \\
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' '' \\
      'Types: deb' 'URIs: ${DEBIAN_MIRROR%/debian}/debian-security' 'Suites: bookworm-security' \\
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \\
      >/etc/apt/sources.list.d/debian.sources
LABEL $STANDIN_LABEL="debian:bookworm (debootstrap --variant=minbase)"
EOF
  podman build --quiet --network host --pull=never -t "$DEBIAN_BASE" "$tmp" >/dev/null
  rm -rf "$tmp"
}

maven() {
  if command -v mvn >/dev/null 2>&1; then command -v mvn
  elif [[ -x "$ROOT/.kafka/maven/bin/mvn" ]]; then echo "$ROOT/.kafka/maven/bin/mvn"
  else die "no Maven: run '$0 setup' (installs Debian's maven) or 'deploy/local/kafka.sh fetch'"
  fi
}

kafka_jars_for() {  # $1 = apache/kafka:<version>: that version's jars, from Maven Central
  local version="${1##*:}" libs
  libs="$ROOT/.kafka/image-libs-$version"
  [[ -f "$libs/VERSION" ]] && return 0
  say "resolving Kafka $version's jars from Maven Central for the $1 stand-in"
  mkdir -p "$ROOT/.kafka"
  rm -rf "$libs.tmp"
  "$(maven)" -B -q -f "$IMAGES/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -Dkafka.version="$version" -DoutputDirectory="$libs.tmp" \
    >"$ROOT/.kafka/image-libs.log" 2>&1 \
    || { tail -n 20 "$ROOT/.kafka/image-libs.log" >&2; die "could not fetch Kafka $version"; }
  echo "$version" >"$libs.tmp/VERSION"
  rm -rf "$libs"
  mv "$libs.tmp" "$libs"
}

kafka_standin() {  # $1 = apache/kafka:<version>, $2 = recipe hash
  local image="$1" hash="$2" version="${1##*:}" context
  kafka_jars_for "$image"
  context="$(mktemp -d)"
  cp -r "$IMAGES/kafka/." "$context/"
  cp -r "$ROOT/.kafka/image-libs-$version" "$context/libs"
  rm -f "$context/pom.xml" "$context/libs/VERSION"
  build_standin "$image" "$context" "$hash" --build-arg "KAFKA_VERSION=$version"
  rm -rf "$context"
}

cuda_base() {
  local image keyring tmp hash
  image="$(image_name cuda)"
  hash="$(recipe_hash /dev/null "noble $UBUNTU_MIRROR $image v1")"
  needs_build "$(qualified "$image")" "$hash" || return 0
  tmp="$(mktemp -d)"
  say "fetching Ubuntu's archive keyring (pinned sha256) for the $image stand-in"
  curl -fsS -m 120 -o "$tmp/keyring.deb" "$UBUNTU_MIRROR/$UBUNTU_KEYRING_DEB" \
    || die "could not fetch $UBUNTU_MIRROR/$UBUNTU_KEYRING_DEB"
  echo "$UBUNTU_KEYRING_SHA256  $tmp/keyring.deb" | sha256sum -c --quiet \
    || die "Ubuntu keyring checksum mismatch"
  dpkg-deb -x "$tmp/keyring.deb" "$tmp/keyring"
  keyring="$tmp/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg"
  bootstrap_import localhost/qrsight-standin/ubuntu:noble noble "$UBUNTU_MIRROR" \
    --components=main,universe --keyring="$keyring"
  cat >"$tmp/Containerfile" <<EOF
FROM localhost/qrsight-standin/ubuntu:noble
RUN rm -f /etc/apt/sources.list && printf '%s\n' \\
      'Types: deb' 'URIs: ${UBUNTU_MIRROR}' 'Suites: noble noble-updates noble-security' \\
      'Components: main restricted universe multiverse' \\
      'Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg' \\
      >/etc/apt/sources.list.d/ubuntu.sources
# what nvidia/cuda's runtime images set; the libraries themselves are not here
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \\
    CUDA_VERSION=${image#*:} \\
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \\
    PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL $STANDIN_LABEL="$image without CUDA or cuDNN: Ubuntu 24.04 (debootstrap) (deploy/local/containers.sh)"
EOF
  build_standin "$image" "$tmp" "$hash"
  podman rmi localhost/qrsight-standin/ubuntu:noble >/dev/null
  rm -rf "$tmp"
}

# ---------------------------------------------------------------------------- qrsight images
pip_secrets() {  # $1 = dir: writes pip.conf (and names the CA bundle) from this machine's pip
  "$PYTHON" - "$1" <<'EOF'
import configparser, os, re, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                     text=True, check=False).stdout
keep = {"index-url", "extra-index-url", "trusted-host", "proxy", "timeout", "default-timeout",
        "retries", "cert"}
found = {}
for line in out.splitlines():  # global.cert='...', :env:.cert='...' (env wins: it comes last)
    match = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line)
    if match and match.group(1) in keep:
        found[match.group(1)] = match.group(2)
cert = found.pop("cert", None) or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
conf = configparser.ConfigParser()
conf["global"] = found
if cert and os.path.isfile(cert):
    conf["global"]["cert"] = "/run/secrets/pip-ca"
    with open(os.path.join(sys.argv[1], "pip-ca.path"), "w") as f:
        f.write(cert)
with open(os.path.join(sys.argv[1], "pip.conf"), "w") as f:
    conf.write(f)
EOF
}

build_image() {  # $1 = Dockerfile, $2 = image
  local dockerfile="$1" image="$2" secrets start=$SECONDS args=() log
  log="$RUN_BASE/build-${dockerfile##*/}.log"
  secrets="$(mktemp -d)"
  chmod 700 "$secrets"
  pip_secrets "$secrets"
  args+=(--secret "id=pip.conf,src=$secrets/pip.conf")
  [[ -f "$secrets/pip-ca.path" ]] && args+=(--secret "id=pip-ca,src=$(cat "$secrets/pip-ca.path")")
  say "building $image from $dockerfile (pip settings of this machine as build secrets)"
  # docker format keeps the HEALTHCHECK (OCI image configs have no field for it)
  if ! podman build --format docker --network host --pull=never "${args[@]}" \
      -f "$ROOT/$dockerfile" -t "$image" "$ROOT" >"$log" 2>&1; then
    rm -rf "$secrets"
    tail -n 40 "$log" >&2
    die "building $image failed (log: $log)"
  fi
  rm -rf "$secrets"
  say "$image built in $((SECONDS - start)) s"
}

build() {
  mkdir -p "$RUN_BASE"
  build_image deploy/docker/Dockerfile "$(image_name qrsight)"
}

build_cuda() {
  mkdir -p "$RUN_BASE"
  standin_needed python && ensure_debian_base
  standin python
  cuda_base
  build_image deploy/docker/Dockerfile.cuda "$(image_name qrsight_cuda)"
}

# ---------------------------------------------------------------------------- the stack
socket_path() { echo "$RUN_DIR/podman.sock"; }

compose() {
  DOCKER_HOST="unix://$(socket_path)" docker-compose -f "$ROOT/docker-compose.yml" \
    -p "$PROJECT" "$@"
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_service() {  # podman's Docker-compatible API on a socket of this project
  mkdir -p "$RUN_DIR"
  alive "$RUN_DIR/service.pid" && return 0
  rm -f "$(socket_path)"
  setsid podman system service --time=0 "unix://$(socket_path)" \
    >"$RUN_DIR/service.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/service.pid"
  local waited=0
  until curl -fsS --unix-socket "$(socket_path)" http://d/_ping >/dev/null 2>&1; do
    ((waited++ < 100)) || die "podman system service did not answer (log: $RUN_DIR/service.log)"
    sleep 0.1
  done
}

start_ticker() {
  alive "$RUN_DIR/ticker.pid" && return 0
  setsid "$0" _health-ticker >"$RUN_DIR/ticker.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/ticker.pid"
}

seconds() {  # a Go duration (10s, 1m30s, 500ms) in whole seconds, at least 1
  local d="$1" total=0 n
  [[ "$d" =~ ([0-9]+)h ]] && total=$((total + BASH_REMATCH[1] * 3600))
  [[ "$d" =~ ([0-9]+)m([0-9]|$) ]] && total=$((total + BASH_REMATCH[1] * 60))
  [[ "$d" =~ ([0-9.]+)s$ ]] && [[ "$d" != *ms ]] && n="${BASH_REMATCH[1]}" && total=$((total + ${n%.*}))
  echo $((total > 0 ? total : 1))
}

aardvark_binary() {
  local dir
  for dir in /usr/lib/podman /usr/libexec/podman /usr/local/libexec/podman; do
    [[ -x "$dir/aardvark-dns" ]] && { echo "$dir/aardvark-dns"; return; }
  done
}

dns_watchdog() {
  # aardvark-dns 1.4, podman 4.3's name server for container names, stopped for good once
  # here while containers started and stopped at the same moment on a loaded machine (it
  # tears its servers down and up on every reload; the exact cause is not pinned down);
  # after that no container resolved `kafka`. Start it again as netavark does: it reads
  # the same config.
  local conf=/run/containers/networks/aardvark-dns binary
  ps -C aardvark-dns -o stat= 2>/dev/null | grep -qv '^Z' && return 0
  local file networks=0
  for file in "$conf"/*; do
    [[ -f "$file" && "${file##*/}" != aardvark.pid ]] && networks=1
  done
  ((networks)) || return 0  # no network with containers: none is needed
  binary="$(aardvark_binary)"
  [[ -n "$binary" ]] || return 0
  echo "containers: aardvark-dns had stopped: starting it again ($(date -u +%T))"
  "$binary" --config "$conf" -p 53 run >/dev/null 2>&1 </dev/null || true
}

health_ticker() {
  # Docker's daemon runs each container's HEALTHCHECK every `interval` (every 5 s during the
  # start period, as Docker 25's start_interval); podman does it with systemd timers, and
  # there is no systemd here, so this loop does it for the project's running containers.
  local -A due=() running=()
  local id health interval now
  while :; do
    now=$SECONDS
    dns_watchdog
    while read -r id health interval; do
      [[ -n "$id" && "$health" =~ ^(starting|healthy|unhealthy)$ ]] || continue
      [[ -n "${running[$id]:-}" ]] && kill -0 "${running[$id]}" 2>/dev/null && continue
      ((now >= ${due[$id]:-0})) || continue
      podman healthcheck run "$id" >/dev/null 2>&1 &
      running[$id]=$!
      if [[ "$health" == starting ]]; then due[$id]=$((now + 5)); else due[$id]=$((now + $(seconds "$interval"))); fi
    done < <(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" \
               | xargs -r podman inspect --format '{{.Id}} {{.State.Health.Status}} {{.Config.Healthcheck.Interval}}' 2>/dev/null)
    sleep 1
  done
}

services_here() {  # the compose services to start: those whose image is here or is built here
  local service image build
  while read -r service image build; do
    if [[ "$build" == build ]] || podman image exists "$(qualified "$image")"; then
      echo "$service"
    else
      say "leaving out $service: no $image image here (no registry to pull it from, no stand-in)" >&2
    fi
  done < <("$PYTHON" - "$ROOT/docker-compose.yml" <<'EOF'
import sys, yaml
for name, svc in yaml.safe_load(open(sys.argv[1]))["services"].items():
    if not svc.get("profiles"):
        print(name, svc["image"], "build" if "build" in svc else "-")
EOF
)
}

up() {
  local services=("$@")
  ((${#services[@]})) || mapfile -t services < <(services_here)
  local image
  image="$(image_name qrsight)"
  podman image exists "$image" || die "no $image image: run '$0 build' first"
  start_service
  start_ticker
  say "starting ${services[*]} (project $PROJECT)"
  compose up -d --no-build "${services[@]}"
  say "up: API http://localhost:${API_HOST_PORT:-8000}/api/v1/ready," \
      "Kafka localhost:${KAFKA_HOST_PORT:-9092}, Prometheus http://localhost:${PROMETHEUS_HOST_PORT:-9090}"
  say "stop with: $0 down"
}

leftovers() {  # containers, networks and volumes of this project still here
  local filter="label=com.docker.compose.project=$PROJECT"
  podman ps -a --filter "$filter" --format 'container {{.Names}}'
  podman network ls --filter "$filter" --format 'network {{.Name}}'
  podman volume ls --filter "$filter" --format 'volume {{.Name}}'
}

down() {
  start_service
  compose down --volumes --remove-orphans --timeout 30
  local pid
  for pid in ticker service; do
    if alive "$RUN_DIR/$pid.pid"; then kill "$(cat "$RUN_DIR/$pid.pid")" 2>/dev/null || true; fi
  done
  grep -h "aardvark-dns" "$RUN_DIR/ticker.log" 2>/dev/null || true
  rm -rf "$RUN_DIR"
  local left
  left="$(leftovers)"
  [[ -z "$left" ]] || die "left behind: $(echo "$left" | paste -sd, -)"
  say "down: no container, network or volume of $PROJECT left"
}

clean() {
  local image
  for image in "$(image_name qrsight)" "$(image_name qrsight_cuda)"; do
    podman image exists "$image" && podman rmi -f "$image" >/dev/null && say "removed $image"
  done
  while read -r image; do
    [[ -n "$image" ]] && podman rmi -f "$image" >/dev/null && say "removed $image"
  done < <(podman images --filter "label=$STANDIN_LABEL" --format '{{.Repository}}:{{.Tag}}' | grep -v '<none>' || true)
  podman image prune -f >/dev/null
  say "clean"
}

command="${1:-}"
[[ $# -gt 0 ]] && shift
case "$command" in
  setup) setup ;;
  bases) bases ;;
  build) build ;;
  build-cuda) build_cuda ;;
  prepare) setup; mkdir -p "$RUN_BASE"; bases build ;;
  up) up "$@" ;;
  down) down ;;
  compose) start_service; compose "$@" ;;
  clean) clean ;;
  _health-ticker) health_ticker ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
