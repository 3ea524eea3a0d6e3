#!/usr/bin/env bash
# A local single-node Apache Kafka (KRaft, combined broker + controller), no Docker.
#
#   deploy/local/kafka.sh fetch    resolve the broker's jars from Maven Central (once)
#   deploy/local/kafka.sh up       fetch if needed, format the data dir once, start, wait
#   deploy/local/kafka.sh down     stop it (SIGTERM, then SIGKILL after KAFKA_STOP_TIMEOUT)
#   deploy/local/kafka.sh status   exit 0 if running (prints where), 3 if not
#
# Needs Java 17+ and python3; Maven is used if on PATH, else downloaded once from
# Maven Central into the cache. Environment (all optional):
#   QRSIGHT_KAFKA_PORT     client port on 127.0.0.1 (default 9092)
#   KAFKA_HOME_DIR         this broker's state: data/, logs/, pid, config (default .kafka/)
#   KAFKA_LIB_DIR          jar cache, shared by every broker (default .kafka/lib)
#   KAFKA_CONTROLLER_PORT  KRaft controller port (default: a free port, kept across restarts)
#   KAFKA_VERSION          Kafka version to fetch (default 4.4.0, falling back to 4.1.1)
#   KAFKA_HEAP_OPTS        JVM heap flags (default -Xms256m -Xmx512m)
#   KAFKA_JVM_PERFORMANCE_OPTS  JVM GC/JIT flags (default: -XX:+UseSerialGC on a host of
#                          up to 2 cores, else -XX:+UseG1GC -XX:MaxGCPauseMillis=20)
#   KAFKA_OVERRIDES        extra broker properties, space-separated key=value (passed as
#                          --override; e.g. "num.network.threads=3 num.io.threads=8")
# Thread counts and the collector follow the host's cores (see host_profile); a
# production broker on its own hosts needs Kafka's defaults instead (README, "Kafka").
#   KAFKA_START_TIMEOUT    seconds to wait for a metadata answer (default 60)
#   KAFKA_STOP_TIMEOUT     seconds to wait after SIGTERM before SIGKILL (default 20)
#   KAFKA_SECURITY         plaintext (default) or sasl_ssl: TLS, SASL/SCRAM-SHA-512, ACLs and
#                          each role's client settings in <KAFKA_HOME_DIR>/clients/ (security.sh)
# Tests start a second, independent broker with their own KAFKA_HOME_DIR and port.
#
# A local three-node cluster (cluster-up, cluster-down, cluster-status, pid NODE_ID,
# bootstrap) lives in deploy/local/cluster.sh, which this script sources; see there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/deploy/local"
PYTHON="${PYTHON:-python3}"
PORT="${QRSIGHT_KAFKA_PORT:-9092}"
HOME_DIR="${KAFKA_HOME_DIR:-$ROOT/.kafka}"
LIB_DIR="${KAFKA_LIB_DIR:-$ROOT/.kafka/lib}"
DATA_DIR="$HOME_DIR/data"
LOG_DIR="$HOME_DIR/logs"
PID_FILE="$HOME_DIR/kafka.pid"
PORT_FILE="$HOME_DIR/kafka.port"
CPORT_FILE="$HOME_DIR/controller.port"
CONFIG="$HOME_DIR/server.properties"
MAVEN_VERSION=3.9.9
MAVEN_CENTRAL=https://repo1.maven.org/maven2
START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-20}"

say() { echo "kafka: $*"; }
die() { echo "kafka: error: $*" >&2; exit 1; }

# shellcheck source=deploy/local/security.sh
source "$HERE/security.sh"

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then echo "$JAVA_HOME/bin/java"; else echo java; fi
}

need_java() {
  local java version major
  java="$(java_bin)"
  command -v "$java" >/dev/null 2>&1 || die "Java 17+ is required (no 'java' on PATH, JAVA_HOME unset)"
  version="$("$java" -version 2>&1 | head -n1 | sed -E 's/.*version "([^"]+)".*/\1/')"
  major="${version%%.*}"
  [[ "$major" =~ ^[0-9]+$ && "$major" -ge 17 ]] || die "Java 17+ is required, found '$version' ($java)"
}

# ---------------------------------------------------------------------------- fetch
lib_ready() { [[ -f "$LIB_DIR/VERSION" ]] && compgen -G "$LIB_DIR/kafka_2.13-*.jar" >/dev/null; }

maven_bin() {
  if command -v mvn >/dev/null 2>&1; then command -v mvn; return; fi
  local dir="$ROOT/.kafka/maven" url
  if [[ ! -x "$dir/bin/mvn" ]]; then
    url="$MAVEN_CENTRAL/org/apache/maven/apache-maven/$MAVEN_VERSION/apache-maven-$MAVEN_VERSION-bin.tar.gz"
    say "no mvn on PATH: downloading Apache Maven $MAVEN_VERSION from Maven Central" >&2
    "$PYTHON" - "$url" "$dir" <<'EOF' || die "could not download Maven from $url"
import hashlib, io, sys, tarfile, urllib.request
url, dest = sys.argv[1], sys.argv[2]
data = urllib.request.urlopen(url, timeout=60).read()
want = urllib.request.urlopen(url + ".sha512", timeout=60).read().decode().split()[0]
if hashlib.sha512(data).hexdigest() != want:
    sys.exit("checksum mismatch")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    tar.extractall(dest + ".tmp", filter="tar")
import os, shutil, glob
shutil.rmtree(dest, ignore_errors=True)
os.rename(glob.glob(dest + ".tmp/apache-maven-*")[0], dest)
shutil.rmtree(dest + ".tmp", ignore_errors=True)
EOF
  fi
  echo "$dir/bin/mvn"
}

fetch_version() {  # $1 = kafka version; copies runtime jars into a temp dir, then swaps it in
  local version="$1" mvn tmp log
  mvn="$(maven_bin)"
  tmp="$LIB_DIR.tmp.$$"
  log="$ROOT/.kafka/fetch.log"
  rm -rf "$tmp"
  say "resolving org.apache.kafka:kafka_2.13:$version and its runtime dependencies (Maven Central)"
  if ! "$mvn" -B -q -f "$HERE/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" -Dkafka.version="$version" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -rf "$tmp"
    return 1
  fi
  echo "$version" >"$tmp/VERSION"
  rm -rf "$LIB_DIR"
  mv "$tmp" "$LIB_DIR"
}

fetch() {
  if lib_ready && [[ -z "${KAFKA_VERSION:-}" || "$(cat "$LIB_DIR/VERSION")" == "${KAFKA_VERSION:-}" ]]; then
    say "jars cached: Kafka $(cat "$LIB_DIR/VERSION") in $LIB_DIR"
    return
  fi
  need_java
  mkdir -p "$ROOT/.kafka" "$(dirname "$LIB_DIR")"
  # Several test sessions may start brokers at once: one fetch at a time. The lock's fd
  # is open only during fetch_locked, so the broker never inherits it.
  fetch_locked 9>"$ROOT/.kafka/fetch.lock"
}

fetch_locked() {
  local start=$SECONDS
  if command -v flock >/dev/null 2>&1; then flock -w 900 9 || die "timed out waiting for another fetch"; fi
  if lib_ready && [[ -z "${KAFKA_VERSION:-}" ]]; then
    say "jars cached: Kafka $(cat "$LIB_DIR/VERSION") in $LIB_DIR"
    return
  fi
  if [[ -n "${KAFKA_VERSION:-}" ]]; then
    fetch_version "$KAFKA_VERSION" || die "could not fetch Kafka $KAFKA_VERSION (log: $ROOT/.kafka/fetch.log)"
  elif ! fetch_version 4.4.0; then
    say "Kafka 4.4.0 failed; falling back to 4.1.1"
    fetch_version 4.1.1 || die "could not fetch Kafka (log: $ROOT/.kafka/fetch.log)"
  fi
  say "fetched Kafka $(cat "$LIB_DIR/VERSION") ($(ls "$LIB_DIR" | grep -c '\.jar$') jars) into $LIB_DIR in $((SECONDS - start)) s"
}

# ---------------------------------------------------------------------------- process
is_kafka_pid() {  # a live (not zombie) process whose command line runs kafka.Kafka
  local pid="$1" state
  [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/stat" ]] || return 1
  state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
  [[ "$state" != Z && "$state" != X ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka'
}

running_pid() {  # prints the pid if our broker runs; cleans a stale pid file
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  if is_kafka_pid "$pid"; then echo "$pid"; return 0; fi
  say "removing stale pid file $PID_FILE (pid ${pid:-?} is not a running broker)" >&2
  rm -f "$PID_FILE"
  return 1
}

port_in_use() {  # something accepts connections on 127.0.0.1:$1
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

controller_port() {
  if [[ -n "${KAFKA_CONTROLLER_PORT:-}" ]]; then echo "$KAFKA_CONTROLLER_PORT"; return; fi
  local kept
  kept="$(cat "$CPORT_FILE" 2>/dev/null || true)"
  if [[ "$kept" =~ ^[0-9]+$ && "$kept" != "$PORT" ]] && ! port_in_use "$kept"; then echo "$kept"; return; fi
  free_port
}

message_max_bytes() {  # broker-wide limit: at least 64 MiB and at least qrsight's own limit
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - 2>/dev/null <<'EOF' || echo 67108864
from core.runtime.kafka import message_limits
from core.runtime.settings import load_settings
print(max(64 * 1024 * 1024, message_limits(load_settings()).max_message_bytes))
EOF
}

cores() { nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2; }

# A broker sharing a small host with the whole stack: Kafka's 3 network and 8 I/O threads
# and G1's concurrent threads cost CPU per request there. Measured on 2 cores
# (bench/kafka_cost.py, bench/README.md): 1 network + 2 I/O threads and the serial
# collector (young pauses of a few ms on this 512 MB heap) spent about a fifth less
# broker CPU per image. Bigger hosts get more threads, up to Kafka's defaults, and G1.
network_threads() { local n=$(( $(cores) / 4 )); (( n < 1 )) && n=1; (( n > 3 )) && n=3; echo "$n"; }
io_threads() { local n=$(( $(cores) / 2 )); (( n < 2 )) && n=2; (( n > 8 )) && n=8; echo "$n"; }
gc_opts() {
  if (( $(cores) <= 2 )); then echo "-XX:+UseSerialGC"; else echo "-XX:+UseG1GC -XX:MaxGCPauseMillis=20"; fi
}

render_config() {  # $1 = controller port
  local max_bytes
  max_bytes="$(message_max_bytes)"
  sed -e "s|@PORT@|$PORT|g" -e "s|@CONTROLLER_PORT@|$1|g" -e "s|@DATA_DIR@|$DATA_DIR|g" \
      -e "s|@NETWORK_THREADS@|$(network_threads)|g" -e "s|@IO_THREADS@|$(io_threads)|g" \
      -e "s|@MESSAGE_MAX_BYTES@|$max_bytes|g" \
      -e "s|@SOCKET_REQUEST_MAX_BYTES@|$((max_bytes > 104857600 ? max_bytes + 1048576 : 104857600))|g" \
      "$HERE/server.properties.template" >"$CONFIG"
  if security_enabled; then security_render "$CONFIG" "$1"; fi
}

java_opts() {
  # shellcheck disable=SC2206
  local heap=(${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m})
  # shellcheck disable=SC2206
  local perf=(${KAFKA_JVM_PERFORMANCE_OPTS:-$(gc_opts)})
  printf '%s\n' "${heap[@]}" "${perf[@]}" -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true "-Dlog4j2.configurationFile=$HERE/log4j2.properties" \
    "-Dkafka.logs.dir=$LOG_DIR" -cp "$LIB_DIR/*"
}

format_storage() {
  [[ -f "$DATA_DIR/meta.properties" ]] && return
  local cluster_id opts scram
  mapfile -t scram < <(security_format_args)
  cluster_id="$("$PYTHON" -c 'import base64, uuid
while (u := base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()).startswith("-"): pass
print(u)')"
  mapfile -t opts < <(java_opts)
  say "formatting $DATA_DIR (cluster id $cluster_id)"
  "$(java_bin)" "${opts[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$CONFIG" \
    --ignore-formatted "${scram[@]}" >>"$LOG_DIR/format.log" 2>&1 \
    || { tail -n 20 "$LOG_DIR/format.log" >&2; die "formatting $DATA_DIR failed (log: $LOG_DIR/format.log)"; }
}

wait_ready() {  # $1 = pid; waits for a metadata answer, or the process to die, or the timeout
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$PORT" "$1" "$START_TIMEOUT" \
    "$LOG_DIR/server.log" <<'EOF'
import json, os, socket, sys, time
port, pid, timeout, log = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + timeout

def alive() -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False

def listening() -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False

def answers() -> bool:
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:  # no client yet (before `pip install`): the log line will do
        with open(log, errors="replace") as f:
            return "Kafka Server started" in f.read()
    security = json.loads(os.environ.get("KAFKA_WAIT_CLIENT_CONFIG") or "{}")  # security.sh
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0, **security})
    try:
        admin.list_topics(timeout=max(1.0, min(5.0, deadline - time.monotonic())))
        return True
    except Exception:
        return False

while time.monotonic() < deadline:
    if not alive():
        sys.exit("died")
    if listening() and answers():
        sys.exit(0)
    time.sleep(0.3)
sys.exit("timeout")
EOF
}

up() {
  local pid cport opts start=$SECONDS
  mkdir -p "$HOME_DIR"
  if pid="$(running_pid)"; then
    say "already running (pid $pid) bootstrap=127.0.0.1:$(cat "$PORT_FILE" 2>/dev/null || echo "$PORT")"
    say "log: $LOG_DIR/server.log"
    return 0
  fi
  [[ "$PORT" =~ ^[0-9]+$ ]] || die "QRSIGHT_KAFKA_PORT must be a port number, got '$PORT'"
  if port_in_use "$PORT"; then
    die "port $PORT on 127.0.0.1 is already in use by another process; stop it or set QRSIGHT_KAFKA_PORT to a free port"
  fi
  fetch
  need_java
  cport="$(controller_port)"
  if port_in_use "$cport" || [[ "$cport" == "$PORT" ]]; then
    die "controller port $cport is in use; set KAFKA_CONTROLLER_PORT to a free port"
  fi
  mkdir -p "$DATA_DIR" "$LOG_DIR"
  if security_enabled; then security_prepare; fi
  render_config "$cport"
  format_storage
  mapfile -t opts < <(java_opts)
  say "starting Kafka $(cat "$LIB_DIR/VERSION") on 127.0.0.1:$PORT (controller $cport, data $DATA_DIR)"
  # Own session, so a Ctrl-C in this terminal does not reach it; `down` stops it.
  local overrides=() kv
  for kv in ${KAFKA_OVERRIDES:-}; do overrides+=(--override "$kv"); done
  setsid "$(java_bin)" "${opts[@]}" kafka.Kafka "$CONFIG" "${overrides[@]}" >"$LOG_DIR/kafka.out" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PID_FILE"
  echo "$PORT" >"$PORT_FILE"
  echo "$cport" >"$CPORT_FILE"
  local why
  if security_enabled; then KAFKA_WAIT_CLIENT_CONFIG="$(security_wait_config)"; export KAFKA_WAIT_CLIENT_CONFIG; fi
  if ! why="$(wait_ready "$pid" 2>&1)"; then
    tail -n 30 "$LOG_DIR/server.log" "$LOG_DIR/kafka.out" 2>/dev/null >&2 || true
    if [[ "$why" == *died* ]]; then
      rm -f "$PID_FILE"
      die "the broker exited during start-up; see $LOG_DIR/server.log and $LOG_DIR/kafka.out"
    fi
    stop_pid "$pid" >/dev/null
    die "no metadata answer from 127.0.0.1:$PORT within ${START_TIMEOUT} s; see $LOG_DIR/server.log"
  fi
  say "ready in $((SECONDS - start)) s (pid $pid) bootstrap=127.0.0.1:$PORT"
  say "log: $LOG_DIR/server.log"
  if security_enabled; then security_after_start; return; fi
  say "use it: export QRSIGHT_KAFKA_BOOTSTRAP=127.0.0.1:$PORT"
}

stop_pid() {  # $1 = pid: SIGTERM, wait, SIGKILL
  local pid="$1" waited=0
  kill -TERM "$pid" 2>/dev/null || true
  while is_kafka_pid "$pid" && ((waited < STOP_TIMEOUT * 10)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  if is_kafka_pid "$pid"; then
    say "pid $pid still running after ${STOP_TIMEOUT} s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$PID_FILE"
}

down() {
  local pid
  if ! pid="$(running_pid)"; then
    say "not running ($HOME_DIR)"
    return 0
  fi
  say "stopping pid $pid"
  stop_pid "$pid"
  say "stopped"
}

status() {
  local pid
  if pid="$(running_pid)"; then
    say "running (pid $pid) bootstrap=127.0.0.1:$(cat "$PORT_FILE" 2>/dev/null || echo "$PORT") log=$LOG_DIR/server.log"
    return 0
  fi
  say "not running ($HOME_DIR)"
  return 3
}

# shellcheck source=deploy/local/cluster.sh
source "$HERE/cluster.sh"

case "${1:-}" in
  fetch) fetch ;;
  up) up ;;
  down) down ;;
  status) status ;;
  cluster-up) cluster_up ;;
  cluster-down) cluster_down "${2:-}" ;;
  cluster-status) cluster_status ;;
  pid) cluster_node_pid "${2:-}" ;;
  bootstrap) cluster_print_bootstrap ;;
  *) echo "usage: $0 {fetch|up|down|status|cluster-up|cluster-down [ID]|cluster-status|pid ID|bootstrap}" >&2; exit 2 ;;
esac
