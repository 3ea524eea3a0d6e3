# shellcheck shell=bash
# TLS + SASL/SCRAM-SHA-512 + ACLs for the local broker, sourced by deploy/local/kafka.sh.
#
#   KAFKA_SECURITY=sasl_ssl deploy/local/kafka.sh up    (or: make kafka-up KAFKA_SECURITY=sasl_ssl)
#
# At the first secured start, under $KAFKA_HOME_DIR/security/ (mode 700):
#   ca.pem, ca.key         a CA made here with openssl (KAFKA_CA_DAYS, default 3650)
#   broker.p12             the broker's key and certificate for 127.0.0.1 (IP SAN), signed by
#                          the CA (KAFKA_CERT_DAYS, default 365; made again when it is expired
#                          or ends within a day)
#   <user>.password        random SCRAM passwords of admin, api, worker and reader
# The admin (inter-broker user and super user) gets its SCRAM credential when the data dir is
# formatted (kafka-storage format --add-scram); api, worker and reader get theirs through the
# Admin API once the broker answers, then `qrsight-topics create` and `qrsight-topics acls`
# run as admin. Each role's client settings are written as QRSIGHT_* lines a shell can
# source to $KAFKA_HOME_DIR/clients/<role>.env (admin.env too, for qrsight-topics).
#
# Functions only; kafka.sh calls them when security_enabled. They use kafka.sh's HOME_DIR,
# PORT, HERE, ROOT, PYTHON, DATA_DIR, say and die. The three-node cluster (cluster.sh) uses
# the same functions with SECURITY_DIR and CLIENTS_DIR under KAFKA_CLUSTER_DIR, PORT set to
# each node's client port while its config is rendered, and SECURITY_BOOTSTRAP (the client
# files' bootstrap list, default 127.0.0.1:$PORT) naming all three nodes.

SECURITY_DIR="$HOME_DIR/security"
CLIENTS_DIR="$HOME_DIR/clients"
SECURITY_ROLES=(api worker reader)
CA_DAYS="${KAFKA_CA_DAYS:-3650}"
CERT_DAYS="${KAFKA_CERT_DAYS:-365}"

security_enabled() {  # KAFKA_SECURITY: plaintext (default) or sasl_ssl
  case "${KAFKA_SECURITY:-plaintext}" in
    plaintext | PLAINTEXT) return 1 ;;
    sasl_ssl | SASL_SSL) return 0 ;;
    *) die "KAFKA_SECURITY must be plaintext or sasl_ssl, got '${KAFKA_SECURITY}'" ;;
  esac
}

security_password() {  # $1 = user: its password, made once
  local file="$SECURITY_DIR/$1.password"
  if [[ ! -s "$file" ]]; then
    (umask 077 && openssl rand -hex 24 >"$file") || die "could not write $file"
  fi
  cat "$file"
}

security_prepare() {  # [DATA_DIR...] (default kafka.sh's): directories, passwords, certificates
  command -v openssl >/dev/null 2>&1 || die "KAFKA_SECURITY=sasl_ssl needs openssl on PATH"
  mkdir -p "$SECURITY_DIR" "$CLIENTS_DIR"
  chmod 700 "$SECURITY_DIR" "$CLIENTS_DIR"
  local user data
  for data in "${@:-$DATA_DIR}"; do
    if [[ -f "$data/meta.properties" && ! -s "$SECURITY_DIR/admin.password" ]]; then
      die "$data was formatted without security (no admin SCRAM credential); stop the broker and remove $data, or use another KAFKA_HOME_DIR / KAFKA_CLUSTER_DIR"
    fi
  done
  for user in admin keystore "${SECURITY_ROLES[@]}"; do security_password "$user" >/dev/null; done
  security_ca
  security_broker_cert
}

security_ca() {
  local dir="$SECURITY_DIR"
  if [[ -s "$dir/ca.pem" && -s "$dir/ca.key" ]] \
    && openssl x509 -checkend 86400 -noout -in "$dir/ca.pem" >/dev/null 2>&1; then
    return
  fi
  say "making a CA in $dir (valid $CA_DAYS days)"
  (umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$CA_DAYS" \
    -subj "/CN=qrsight local Kafka CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    >>"$dir/openssl.log" 2>&1) || die "openssl could not make the CA (log: $dir/openssl.log)"
  rm -f "$dir/broker.p12"  # signed by the old CA
}

security_broker_cert() {
  local dir="$SECURITY_DIR" ext
  if [[ -s "$dir/broker.p12" && -s "$dir/broker.pem" ]] \
    && openssl x509 -checkend 86400 -noout -in "$dir/broker.pem" >/dev/null 2>&1; then
    return
  fi
  say "making the broker's certificate for 127.0.0.1 (valid $CERT_DAYS days)"
  ext="$dir/broker.ext"
  printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth,clientAuth" >"$ext"
  (
    umask 077
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=127.0.0.1" \
      -keyout "$dir/broker.key" -out "$dir/broker.csr" \
      && openssl x509 -req -sha256 -in "$dir/broker.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$CERT_DAYS" -extfile "$ext" \
        -out "$dir/broker.pem" \
      && openssl pkcs12 -export -name broker -in "$dir/broker.pem" -inkey "$dir/broker.key" \
        -certfile "$dir/ca.pem" -out "$dir/broker.p12" \
        -passout "file:$dir/keystore.password"
  ) >>"$dir/openssl.log" 2>&1 || die "openssl could not make the broker certificate (log: $dir/openssl.log)"
  rm -f "$dir/broker.csr" "$ext"
}

security_render() {  # $1 = rendered server.properties, $2 = controller port: apply the overlay
  local config="$1" overlay key keys=()
  overlay="$(sed -e "s|@PORT@|$PORT|g" -e "s|@CONTROLLER_PORT@|$2|g" \
    -e "s|@SECURITY_DIR@|$SECURITY_DIR|g" \
    -e "s|@ADMIN_PASSWORD@|$(security_password admin)|g" \
    -e "s|@KEYSTORE_PASSWORD@|$(security_password keystore)|g" \
    "$HERE/server-security.properties.template")"
  mapfile -t keys < <(grep -E '^[a-z]' <<<"$overlay" | cut -d= -f1)
  for key in "${keys[@]}"; do
    sed -i "/^${key//./\\.}=/d" "$config"
  done
  chmod 600 "$config"  # it now holds the admin's password
  printf '\n%s\n' "$overlay" >>"$config"
}

security_format_args() {  # extra arguments of kafka-storage format: the admin's credential
  security_enabled || return 0
  printf '%s\n' --add-scram "SCRAM-SHA-512=[name=admin,password=$(security_password admin)]"
}

security_client_settings() {  # $1 = user: its QRSIGHT_* client settings, NAME VALUE per line pair
  printf '%s\n' \
    QRSIGHT_KAFKA_BOOTSTRAP "${SECURITY_BOOTSTRAP:-127.0.0.1:$PORT}" \
    QRSIGHT_KAFKA_SECURITY_PROTOCOL SASL_SSL \
    QRSIGHT_KAFKA_SASL_MECHANISM SCRAM-SHA-512 \
    QRSIGHT_KAFKA_SASL_USERNAME "$1" \
    QRSIGHT_KAFKA_SASL_PASSWORD "$(security_password "$1")" \
    QRSIGHT_KAFKA_SSL_CA_LOCATION "$SECURITY_DIR/ca.pem"
}

security_client_lines() {  # $1 = user: NAME=VALUE lines a shell can source (values quoted if needed)
  local name value
  while IFS= read -r name && IFS= read -r value; do
    printf '%s=%q\n' "$name" "$value"
  done < <(security_client_settings "$1")
}

security_wait_config() {  # librdkafka properties (JSON) kafka.sh's readiness check uses
  printf '{"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", '
  printf '"sasl.username": "admin", "sasl.password": "%s", "ssl.ca.location": "%s"}' \
    "$(security_password admin)" "$SECURITY_DIR/ca.pem"
}

security_admin_run() {  # run a command with the admin's QRSIGHT_* settings in its environment
  local name value env=()
  while IFS= read -r name && IFS= read -r value; do
    env+=("$name=$value")
  done < <(security_client_settings admin)
  env "${env[@]}" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$@"
}

security_after_start() {  # once the broker answers: users, topics, ACLs, client settings
  local role
  security_admin_run "$PYTHON" - "${SECURITY_ROLES[@]}" <<'EOF' || die "could not create the SCRAM users"
import sys
from pathlib import Path
from confluent_kafka.admin import (
    AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion,
)
from core.runtime.kafka import admin_config
from core.runtime.settings import load_settings

settings = load_settings()
folder = Path(settings.kafka_ssl_ca_location).parent
admin = AdminClient(admin_config(settings))
upserts = [
    UserScramCredentialUpsertion(
        user,
        ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
        (folder / f"{user}.password").read_text().strip().encode(),
    )
    for user in sys.argv[1:]
]
for user, future in admin.alter_user_scram_credentials(upserts, request_timeout=30).items():
    future.result(timeout=40)
    print(f"kafka: SCRAM-SHA-512 credential of {user} set", flush=True)
EOF
  security_admin_run "$PYTHON" -m producer_tools.topics create >/dev/null \
    || die "could not create the topics as admin"
  security_admin_run "$PYTHON" -m producer_tools.topics acls \
    || die "could not create the ACLs as admin"
  for role in "${SECURITY_ROLES[@]}" admin; do
    (umask 077 && security_client_lines "$role" >"$CLIENTS_DIR/$role.env")
  done
  say "client settings: $CLIENTS_DIR/{api,worker,reader,admin}.env"
  say "use them: set -a; . $CLIENTS_DIR/api.env; set +a"
}
