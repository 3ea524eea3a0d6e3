# shellcheck shell=bash
# A local three-node Apache Kafka cluster (KRaft): sourced by deploy/local/kafka.sh, which
# provides the jar fetch and process helpers (say, die, fetch, is_kafka_pid, ...).
#
#   deploy/local/kafka.sh cluster-up           start every node that is not running (format
#                                              a node's data dir only the first time), wait
#                                              until all three are brokers, print bootstrap
#   deploy/local/kafka.sh cluster-down [ID]    stop every node, or only node ID (SIGTERM,
#                                              then SIGKILL after KAFKA_STOP_TIMEOUT)
#   deploy/local/kafka.sh cluster-status       one line per node; exit 0 if all three run
#   deploy/local/kafka.sh pid ID               the pid of node ID (exit 3 if not running)
#   deploy/local/kafka.sh bootstrap            the cluster's bootstrap list
#
# Every node is a combined broker + controller (a controller quorum of three, static
# voters), with its own client port, controller port, data and log folder under
# KAFKA_CLUSTER_DIR/node-<id>, and broker.rack=rack-<id> (KIP-392 fetches from the
# closest replica for clients that set client.rack). Environment (all optional):
#   KAFKA_CLUSTER_DIR          the cluster's state (default .kafka/cluster)
#   KAFKA_CLUSTER_PORT         client port of node 1; nodes 2 and 3 take the next two
#                              (default 19092, so 19092-19094)
#   KAFKA_CLUSTER_PORTS        three client ports, comma-separated (instead of the above)
#   KAFKA_CLUSTER_CONTROLLER_PORTS  three controller ports (default: client ports + 100)
#   KAFKA_CLUSTER_HEAP_OPTS    JVM heap flags of each node (default -Xms256m -Xmx384m)
#   KAFKA_CLUSTER_OVERRIDES    extra broker properties for every node (key=value ...)
#   KAFKA_START_TIMEOUT        seconds to wait for all three brokers (default 120 here)
#   KAFKA_SECURITY             plaintext (default) or sasl_ssl: every node as the single
#                              broker (security.sh): TLS + SASL/SCRAM-SHA-512 on the client
#                              and inter-broker listener, SASL PLAIN over TLS between the
#                              controllers, StandardAuthorizer, super user admin
# The ports are kept in KAFKA_CLUSTER_DIR/ports on the first start and reused after it,
# so a node brought back after a kill comes back where the others expect it.
#
# Secured, the cluster keeps its own CA, certificate (one, for 127.0.0.1, used by every
# node) and passwords in KAFKA_CLUSTER_DIR/security and its client settings in
# KAFKA_CLUSTER_DIR/clients/<role>.env (bootstrap = the three nodes), so it never touches
# the single broker's .kafka/security or .kafka/clients. Every node is formatted with the
# same admin SCRAM credential; the roles' users, the topics (replication 3, min ISR 2) and
# the ACLs are made once, at the first start that finds no clients/admin.env.

CLUSTER_DIR="${KAFKA_CLUSTER_DIR:-$ROOT/.kafka/cluster}"
CLUSTER_NODES=(1 2 3)
CLUSTER_PORTS_FILE="$CLUSTER_DIR/ports"
CLUSTER_START_TIMEOUT="${KAFKA_START_TIMEOUT:-120}"  # three JVMs starting on a small host

cluster_node_dir() { echo "$CLUSTER_DIR/node-$1"; }

cluster_security_paths() {  # security.sh's folders and client bootstrap, for the cluster
  SECURITY_DIR="$CLUSTER_DIR/security"
  CLIENTS_DIR="$CLUSTER_DIR/clients"
  SECURITY_BOOTSTRAP="$(cluster_bootstrap)"
}

cluster_pick_ports() {  # writes "id port controller_port" lines once
  [[ -f "$CLUSTER_PORTS_FILE" ]] && return
  local base="${KAFKA_CLUSTER_PORT:-19092}" ports cports i
  if [[ -n "${KAFKA_CLUSTER_PORTS:-}" ]]; then
    IFS=', ' read -r -a ports <<<"$KAFKA_CLUSTER_PORTS"
  else
    ports=("$base" "$((base + 1))" "$((base + 2))")
  fi
  if [[ -n "${KAFKA_CLUSTER_CONTROLLER_PORTS:-}" ]]; then
    IFS=', ' read -r -a cports <<<"$KAFKA_CLUSTER_CONTROLLER_PORTS"
  else
    cports=("$((ports[0] + 100))" "$((ports[1] + 100))" "$((ports[2] + 100))")
  fi
  ((${#ports[@]} == 3 && ${#cports[@]} == 3)) \
    || die "KAFKA_CLUSTER_PORTS and KAFKA_CLUSTER_CONTROLLER_PORTS need three ports each"
  mkdir -p "$CLUSTER_DIR"
  for i in 0 1 2; do
    [[ "${ports[$i]}" =~ ^[0-9]+$ && "${cports[$i]}" =~ ^[0-9]+$ ]] \
      || die "cluster ports must be numbers, got '${ports[$i]}' and '${cports[$i]}'"
    echo "$((i + 1)) ${ports[$i]} ${cports[$i]}"
  done >"$CLUSTER_PORTS_FILE"
}

cluster_port() { awk -v id="$1" '$1 == id { print $2 }' "$CLUSTER_PORTS_FILE"; }
cluster_controller_port() { awk -v id="$1" '$1 == id { print $3 }' "$CLUSTER_PORTS_FILE"; }

cluster_bootstrap() {
  local id list=()
  for id in "${CLUSTER_NODES[@]}"; do list+=("127.0.0.1:$(cluster_port "$id")"); done
  (IFS=,; echo "${list[*]}")
}

cluster_voters() {
  local id list=()
  for id in "${CLUSTER_NODES[@]}"; do list+=("$id@127.0.0.1:$(cluster_controller_port "$id")"); done
  (IFS=,; echo "${list[*]}")
}

cluster_pid() {  # $1 = node id: prints its pid if it runs; cleans a stale pid file
  local file pid
  file="$(cluster_node_dir "$1")/kafka.pid"
  [[ -f "$file" ]] || return 1
  pid="$(cat "$file" 2>/dev/null || true)"
  if is_kafka_pid "$pid"; then echo "$pid"; return 0; fi
  rm -f "$file"
  return 1
}

cluster_render() {  # $1 = node id
  local id="$1" dir max_bytes
  dir="$(cluster_node_dir "$id")"
  max_bytes="$(message_max_bytes)"
  sed -e "s|@NODE_ID@|$id|g" -e "s|@VOTERS@|$(cluster_voters)|g" \
      -e "s|@PORT@|$(cluster_port "$id")|g" -e "s|@CONTROLLER_PORT@|$(cluster_controller_port "$id")|g" \
      -e "s|@DATA_DIR@|$dir/data|g" -e "s|@RACK@|rack-$id|g" \
      -e "s|@NETWORK_THREADS@|$(network_threads)|g" -e "s|@IO_THREADS@|$(io_threads)|g" \
      -e "s|@MESSAGE_MAX_BYTES@|$max_bytes|g" \
      -e "s|@SOCKET_REQUEST_MAX_BYTES@|$((max_bytes > 104857600 ? max_bytes + 1048576 : 104857600))|g" \
      "$HERE/cluster.properties.template" >"$dir/server.properties"
  if security_enabled; then
    PORT="$(cluster_port "$id")" security_render "$dir/server.properties" "$(cluster_controller_port "$id")"
  fi
}

cluster_java_opts() {  # $1 = node id
  # shellcheck disable=SC2206
  local heap=(${KAFKA_CLUSTER_HEAP_OPTS:--Xms256m -Xmx384m})
  # shellcheck disable=SC2206
  local perf=(${KAFKA_JVM_PERFORMANCE_OPTS:-$(gc_opts)})
  printf '%s\n' "${heap[@]}" "${perf[@]}" -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true "-Dlog4j2.configurationFile=$HERE/log4j2.properties" \
    "-Dkafka.logs.dir=$(cluster_node_dir "$1")/logs" -cp "$LIB_DIR/*"
}

cluster_id() {  # one cluster id for every node, made once
  local file="$CLUSTER_DIR/cluster.id"
  if [[ ! -s "$file" ]]; then
    "$PYTHON" -c 'import base64, uuid
while (u := base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()).startswith("-"): pass
print(u)' >"$file"
  fi
  cat "$file"
}

cluster_format() {  # $1 = node id; only a node never formatted (a killed node keeps its data)
  local id="$1" dir opts scram
  dir="$(cluster_node_dir "$id")"
  [[ -f "$dir/data/meta.properties" ]] && return
  mapfile -t opts < <(cluster_java_opts "$id")
  mapfile -t scram < <(security_format_args)
  say "formatting node $id ($dir/data)"
  "$(java_bin)" "${opts[@]}" kafka.tools.StorageTool format -t "$(cluster_id)" \
    -c "$dir/server.properties" --ignore-formatted "${scram[@]}" >>"$dir/logs/format.log" 2>&1 \
    || { tail -n 20 "$dir/logs/format.log" >&2; die "formatting node $id failed (log: $dir/logs/format.log)"; }
}

cluster_start_node() {  # $1 = node id
  local id="$1" dir opts overrides=() kv port
  dir="$(cluster_node_dir "$id")"
  port="$(cluster_port "$id")"
  for port in "$port" "$(cluster_controller_port "$id")"; do
    port_in_use "$port" && die "port $port (node $id) on 127.0.0.1 is in use by another process"
  done
  mkdir -p "$dir/data" "$dir/logs"
  cluster_render "$id"
  cluster_format "$id"
  mapfile -t opts < <(cluster_java_opts "$id")
  for kv in ${KAFKA_CLUSTER_OVERRIDES:-}; do overrides+=(--override "$kv"); done
  say "starting node $id on 127.0.0.1:$(cluster_port "$id") (controller $(cluster_controller_port "$id"))"
  setsid "$(java_bin)" "${opts[@]}" kafka.Kafka "$dir/server.properties" "${overrides[@]}" \
    >"$dir/logs/kafka.out" 2>&1 </dev/null &
  echo $! >"$dir/kafka.pid"
}

cluster_wait() {  # waits until every node is a live broker of the cluster, or one dies
  local id pids=()
  for id in "${CLUSTER_NODES[@]}"; do pids+=("$(cat "$(cluster_node_dir "$id")/kafka.pid" 2>/dev/null || echo 0)"); done
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$(cluster_bootstrap)" "$CLUSTER_START_TIMEOUT" \
    "${pids[@]}" <<'EOF'
import json, os, sys, time
from confluent_kafka.admin import AdminClient
bootstrap, timeout, pids = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
security = json.loads(os.environ.get("KAFKA_WAIT_CLIENT_CONFIG") or "{}")  # security.sh
deadline = time.monotonic() + timeout

def alive(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False

def brokers(port: str) -> int:  # live brokers node at 127.0.0.1:port knows of
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0, **security})
    try:
        return len(admin.list_topics(timeout=2).brokers)
    except Exception:
        return 0

ports = [address.rsplit(":", 1)[1] for address in bootstrap.split(",")]
while time.monotonic() < deadline:
    dead = [str(i + 1) for i, pid in enumerate(pids) if not alive(pid)]
    if dead:
        sys.exit(f"node {','.join(dead)} exited")
    if all(brokers(port) == len(ports) for port in ports):
        sys.exit(0)
    time.sleep(0.5)
sys.exit("timeout")
EOF
}

cluster_up() {
  local id pid start=$SECONDS started=() why data=()
  cluster_pick_ports
  if security_enabled; then
    cluster_security_paths
    for id in "${CLUSTER_NODES[@]}"; do data+=("$(cluster_node_dir "$id")/data"); done
    security_prepare "${data[@]}"
    KAFKA_WAIT_CLIENT_CONFIG="$(security_wait_config)"
    export KAFKA_WAIT_CLIENT_CONFIG
  elif [[ -s "$CLUSTER_DIR/security/admin.password" ]]; then
    die "the cluster in $CLUSTER_DIR was made with KAFKA_SECURITY=sasl_ssl: run it the same way (make cluster-up KAFKA_SECURITY=sasl_ssl), or stop it and remove $CLUSTER_DIR"
  fi
  for id in "${CLUSTER_NODES[@]}"; do
    if pid="$(cluster_pid "$id")"; then
      say "node $id already running (pid $pid) on 127.0.0.1:$(cluster_port "$id")"
    else
      started+=("$id")
    fi
  done
  if ((${#started[@]})); then
    fetch
    need_java
    for id in "${started[@]}"; do cluster_start_node "$id"; done
  fi
  if ! why="$(cluster_wait 2>&1)"; then
    for id in "${CLUSTER_NODES[@]}"; do
      tail -n 15 "$(cluster_node_dir "$id")/logs/server.log" 2>/dev/null >&2 || true
    done
    die "the cluster did not come up ($why); logs: $CLUSTER_DIR/node-*/logs/server.log"
  fi
  say "cluster ready in $((SECONDS - start)) s (nodes ${CLUSTER_NODES[*]}; started: ${started[*]:-none})"
  say "logs: $CLUSTER_DIR/node-*/logs/server.log"
  say "bootstrap=$(cluster_bootstrap)"
  if security_enabled; then
    if [[ -s "$CLIENTS_DIR/admin.env" ]]; then
      say "client settings: $CLIENTS_DIR/{api,worker,reader,admin}.env"
    else
      security_after_start  # users, topics (replication 3, min ISR 2), ACLs, client files
    fi
    return
  fi
  say "use it: export QRSIGHT_KAFKA_BOOTSTRAP=$(cluster_bootstrap)"
}

cluster_down() {  # $1 = node id (optional): SIGTERM to all at once, then wait, then SIGKILL
  local ids=("${CLUSTER_NODES[@]}") id pid pids=() waited=0
  [[ -n "${1:-}" ]] && ids=("$1")
  for id in "${ids[@]}"; do
    if pid="$(cluster_pid "$id")"; then
      say "stopping node $id (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  ((${#pids[@]})) || { say "no node running ($CLUSTER_DIR)"; return 0; }
  while ((waited < STOP_TIMEOUT * 10)); do
    local left=0
    for pid in "${pids[@]}"; do is_kafka_pid "$pid" && left=1; done
    ((left)) || break
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do
    if is_kafka_pid "$pid"; then
      say "pid $pid still running after ${STOP_TIMEOUT} s: sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for id in "${ids[@]}"; do rm -f "$(cluster_node_dir "$id")/kafka.pid"; done
  say "stopped node(s) ${ids[*]}"
}

cluster_status() {
  local id pid up=0
  [[ -f "$CLUSTER_PORTS_FILE" ]] || { say "no cluster in $CLUSTER_DIR"; return 3; }
  for id in "${CLUSTER_NODES[@]}"; do
    if pid="$(cluster_pid "$id")"; then
      say "node $id running (pid $pid) 127.0.0.1:$(cluster_port "$id")"
      up=$((up + 1))
    else
      say "node $id not running"
    fi
  done
  say "bootstrap=$(cluster_bootstrap)"
  ((up == ${#CLUSTER_NODES[@]})) || return 3
}

cluster_node_pid() {  # $1 = node id
  [[ "${1:-}" =~ ^[1-3]$ ]] || die "usage: kafka.sh pid NODE_ID (1, 2 or 3)"
  cluster_pid "$1" || { say "node $1 is not running ($CLUSTER_DIR)" >&2; return 3; }
}

cluster_print_bootstrap() {
  [[ -f "$CLUSTER_PORTS_FILE" ]] || die "no cluster in $CLUSTER_DIR (make cluster-up)"
  cluster_bootstrap
}
