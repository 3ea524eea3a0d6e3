"""Static checks of the deploy files (compose, Kubernetes, Dockerfiles), used by test_deploy.

Each ``*_problems`` function returns human-readable problems (empty = fine), so a test can
feed it a deliberately broken document and assert the problem is reported.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from core.runtime.settings import KAFKA_PASSTHROUGH_PREFIX, Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ENV_PREFIX = "QRSIGHT_"
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}

Doc = dict[str, Any]


# --- settings names -------------------------------------------------------------------
def setting_names() -> set[str]:
    """Every ``QRSIGHT_*`` name the code reads (the passthrough prefix aside)."""
    return {env_name(field) for field in Settings.model_fields if field != "kafka_extra"}


def env_problems(names: Iterable[str], where: str) -> list[str]:
    """``QRSIGHT_*`` names that are not settings (other names are not ours to judge)."""
    known = setting_names()
    problems = []
    for name in names:
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        if name.startswith(KAFKA_PASSTHROUGH_PREFIX) and len(name) > len(KAFKA_PASSTHROUGH_PREFIX):
            continue
        problems.append(f"{where}: {name} is not a qrsight setting")
    return problems


# --- YAML -------------------------------------------------------------------------------
def load_docs(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def load_one(path: Path) -> Doc:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


# --- compose ------------------------------------------------------------------------------
COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution (``${VAR:-default}``, ``${VAR}``, ``$$``) throughout."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(3)
        return env.get(name) or (match.group(2) or "")

    return COMPOSE_VARIABLE.sub(one, value)


def load_compose(path: Path, env: Mapping[str, str] | None = None) -> Doc:
    """The compose file as ``docker compose`` reads it with ``env`` (default: none set)."""
    return dict(interpolate(load_one(path), env or {}))


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as a dict (merge keys already resolved by the YAML loader)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {p[0]: (p[1] if len(p) > 1 else "") for p in pairs}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def image_problems(image: str, where: str) -> list[str]:
    """hadolint DL3006/DL3007 in spirit: an explicit, non-``latest`` version tag."""
    last = image.rsplit("/", maxsplit=1)[-1]
    tag = last.rpartition(":")[2] if ":" in last else ""
    if "@sha256:" in image:
        return []
    if not tag:
        return [f"{where}: image {image} has no tag"]
    if tag == "latest" or not re.search(r"\d", tag):
        return [f"{where}: image {image} is not pinned to a version"]
    return []


def compose_problems(compose: Mapping[str, Any]) -> list[str]:
    services: Mapping[str, Any] = compose.get("services") or {}
    problems: list[str] = []
    for name, service in services.items():
        problems += env_problems(compose_env(service), f"docker-compose.yml service {name}")
        if "image" in service:
            problems += image_problems(service["image"], f"docker-compose.yml service {name}")
        problems += depends_problems(name, service, services)
    return problems


def depends_problems(
    name: str, service: Mapping[str, Any], services: Mapping[str, Any]
) -> list[str]:
    problems = []
    depends = service.get("depends_on") or {}
    for dep, spec in depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends):
        if dep not in services:
            problems.append(f"service {name} depends on unknown service {dep}")
            continue
        condition = (spec or {}).get("condition", "service_started")
        healthcheck = services[dep].get("healthcheck") or {}
        if condition == "service_healthy" and (
            not healthcheck.get("test") or healthcheck.get("disable")
        ):
            problems.append(
                f"service {name} waits for {dep} to be healthy but it has no healthcheck"
            )
    return problems


# --- Dockerfiles ----------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    if pending:
        joined.append(pending)
    pairs = []
    for line in joined:
        word, _, rest = line.partition(" ")
        pairs.append((word.upper(), rest.strip()))
    return pairs


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instr, args in instructions:
        if instr == "FROM":
            found.append([])
        if found:
            found[-1].append((instr, args))
    return found


def env_pairs(args: str) -> dict[str, str]:
    """Names and values of an ENV instruction (``A=1 B=2`` or legacy ``A 1``)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def resolve_from(image: str, args: Mapping[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


def dockerfile_problems(text: str, where: str) -> list[str]:
    instructions = dockerfile_instructions(text)
    global_args = {}
    for instr, args in instructions:
        if instr == "FROM":
            break
        if instr == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            global_args[key] = value.strip('"')
    problems: list[str] = []
    stage_names: set[str] = set()
    for stage in stages(instructions):
        image_words = stage[0][1].split()
        image = resolve_from(image_words[0], global_args)
        if image not in stage_names:
            problems += image_problems(image, f"{where} FROM")
        if len(image_words) >= 3 and image_words[1].upper() == "AS":
            stage_names.add(image_words[2])
    final = stages(instructions)[-1] if instructions else []
    problems += final_stage_problems(final, where)
    for instr, args in instructions:
        problems += instruction_problems(instr, args, where)
    return problems


def final_stage_problems(final: list[tuple[str, str]], where: str) -> list[str]:
    problems = []
    users = [args for instr, args in final if instr == "USER"]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append(f"{where}: the runtime stage must end as a non-root USER")
    if not any(instr == "HEALTHCHECK" and "NONE" not in args.upper() for instr, args in final):
        problems.append(f"{where}: the runtime stage has no HEALTHCHECK")
    for instr in ("ENTRYPOINT", "CMD"):
        given = [args for i, args in final if i == instr]
        if not given or not given[-1].startswith("["):
            problems.append(f"{where}: {instr} must be given in exec (JSON) form")
    return problems


def instruction_problems(instr: str, args: str, where: str) -> list[str]:
    problems = []
    if instr == "ENV":
        problems += env_problems(env_pairs(args), f"{where} ENV")
    if instr == "ADD" and re.search(r"https?://", args):
        problems.append(f"{where}: ADD of a URL (use RUN with a checksum)")
    if instr == "RUN" and "apt-get install" in args:
        if "--no-install-recommends" not in args:
            problems.append(f"{where}: apt-get install without --no-install-recommends")
        if "rm -rf /var/lib/apt/lists" not in args:
            problems.append(f"{where}: apt lists are left in the layer")
    if instr == "RUN" and re.search(r"\bsudo\b", args):
        problems.append(f"{where}: sudo in RUN")
    return problems


PIP_SECRET_MOUNTS = (
    "--mount=type=secret,id=pip.conf,target=/etc/pip.conf",
    "--mount=type=secret,id=pip-ca",
)
PIP_FETCH = re.compile(r"\bpip3? +(install|wheel|download)\b")
PIP_SETTING_ENV = re.compile(
    r"\bPIP_(CERT|INDEX_URL|EXTRA_INDEX_URL|CLIENT_CERT|CONFIG_FILE|PROXY)\b"
)


def pip_secret_problems(text: str, where: str) -> list[str]:
    """A build that fetches from PyPI gets the machine's pip settings (private index, proxy
    CA) as build secrets on every pip step, and never keeps them in a layer."""
    problems = []
    for instr, args in dockerfile_instructions(text):
        if instr == "RUN" and PIP_FETCH.search(args):
            missing = [m for m in PIP_SECRET_MOUNTS if m not in args]
            if missing:
                problems.append(f"{where}: RUN {args[:50]}... runs pip without {missing}")
        if instr in ("COPY", "ADD") and re.search(r"pip\.conf|\.pem\b|\.crt\b", args):
            problems.append(f"{where}: {instr} {args} bakes pip settings into a layer")
        if instr in ("ENV", "ARG") and PIP_SETTING_ENV.search(args):
            problems.append(f"{where}: {instr} {args} keeps pip settings in the image")
    return problems


def model_copies(text: str) -> dict[str, str]:
    """Source → destination of the final stage's COPYs of ``.onnx`` models."""
    final = stages(dockerfile_instructions(text))[-1]
    copies = {}
    for instr, args in final:
        words = args.split()
        local = not any(w.startswith("--from") for w in words)
        if instr == "COPY" and local and words and words[0].endswith(".onnx"):
            copies[words[0]] = words[-1]
    return copies


def final_env(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in stages(dockerfile_instructions(text))[-1]:
        if instr == "ENV":
            env.update(env_pairs(args))
    return env


def copy_sources(text: str) -> list[str]:
    """Paths the Dockerfile copies from the build context."""
    sources = []
    for instr, args in dockerfile_instructions(text):
        words = [w for w in args.split() if not w.startswith("--")]
        if instr in {"COPY", "ADD"} and not any(w.startswith("--from") for w in args.split()):
            sources += words[:-1]
    return sources


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, ``!`` re-includes."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes) or (
            pat.startswith("**/") and any(fnmatch.fnmatchcase(p, pat[3:]) for p in parts)
        ):
            ignored = not negate
    return ignored


def dockerignore_patterns(text: str) -> list[str]:
    return [
        line.strip().rstrip("/")
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


# --- Kubernetes: a small kustomize (resources, namespace, images, patches) ------------------
def render_kustomization(folder: Path) -> list[Doc]:
    """Render a kustomization the way ``kubectl kustomize`` does for the features we use."""
    kustomization = load_one(folder / "kustomization.yaml")
    unsupported = set(kustomization) - KUSTOMIZE_KEYS
    assert not unsupported, f"{folder}: kustomize features this check cannot render: {unsupported}"
    docs: list[Doc] = []
    for resource in kustomization.get("resources", []):
        target = folder / resource
        docs += render_kustomization(target) if target.is_dir() else load_docs(target)
    docs = [copy.deepcopy(doc) for doc in docs]
    for patch in kustomization.get("patches", []):
        docs = apply_patch(docs, load_one(folder / patch["path"]))
    for doc in docs:
        set_images(doc, kustomization.get("images", []))
        if "namespace" in kustomization and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def apply_patch(docs: list[Doc], patch: Doc) -> list[Doc]:
    """A patch merges into the resource it names; ``$patch: delete`` removes that resource."""
    key = (patch["kind"], patch["metadata"]["name"])
    matched = [d for d in docs if (d["kind"], d["metadata"]["name"]) == key]
    assert matched, f"patch targets {key}, which no resource defines"
    if patch.get("$patch") == "delete":
        return [d for d in docs if d not in matched]
    return [strategic_merge(d, patch, named=built_in(d)) if d in matched else d for d in docs]


def built_in(doc: Doc) -> bool:
    """A Kubernetes kind (core, or an API group under k8s.io), whose schema kustomize knows:
    its lists of named items merge by name. A custom resource's lists (a Strimzi Kafka's
    listeners, say) are replaced whole, as kustomize has no schema for them."""
    group = str(doc.get("apiVersion", "")).rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def strategic_merge(base: Any, patch: Any, *, named: bool = True) -> Any:
    """Maps merge; lists of named items merge by name (patch items first) when ``named``;
    others replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value, named=named) if key in base else value
        return merged
    if (
        named
        and isinstance(base, list)
        and isinstance(patch, list)
        and named_list(base)
        and named_list(patch)
    ):
        by_name = {item["name"]: item for item in base}
        merged_items = [strategic_merge(by_name.get(p["name"], {}), p) for p in patch]
        patched = {p["name"] for p in patch}
        return merged_items + [item for item in base if item["name"] not in patched]
    return patch


def named_list(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def set_images(doc: Doc, images: list[Mapping[str, str]]) -> None:
    for container in containers(doc):
        ref = container["image"]
        name, _, tag = ref.partition(":")
        for image in images:
            if image["name"] == name:
                name = image.get("newName", name)
                tag = image.get("newTag", tag)
        container["image"] = f"{name}:{tag}" if tag else name


# --- Kubernetes: walking documents ----------------------------------------------------
def pod_spec(doc: Doc) -> Doc | None:
    if doc.get("kind") not in POD_TEMPLATE_KINDS:
        return None
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: Doc) -> Iterator[Doc]:
    spec = pod_spec(doc)
    if spec:
        yield from spec.get("containers", [])
        yield from spec.get("initContainers", [])


def k8s_env_names(doc: Doc) -> list[str]:
    """Env names a document sets: ConfigMap keys and containers' ``env``."""
    if doc.get("kind") == "ConfigMap":
        return list((doc.get("data") or {}).keys())
    return [e["name"] for c in containers(doc) for e in c.get("env", [])]


def k8s_problems(docs: Iterable[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        problems += env_problems(k8s_env_names(doc), where)
        for container in containers(doc):
            problems += image_problems(container["image"], f"{where} container {container['name']}")
    return problems


def find(docs: Iterable[Doc], kind: str, name: str | None = None) -> Doc:
    for doc in docs:
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    raise AssertionError(f"no {kind} {name or ''} in the manifests")


def literal_env(container: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- Kubernetes: the workers' identity ------------------------------------------------
def worker_identity_problems(docs: Iterable[Doc], name: str = "qrsight-workers") -> list[str]:
    """What keeps a restarted worker pod from coming back as the same static group member
    and the same transactional producer (so it would stall its partitions for
    session.timeout.ms and read_committed readers for transaction.timeout.ms)."""
    docs = list(docs)
    found = [d for d in docs if d["metadata"]["name"] == name and pod_spec(d) is not None]
    if not found:
        return [f"no workload named {name}"]
    doc = found[0]
    where = f"{doc['kind']}/{name}"
    problems = []
    if doc["kind"] != "StatefulSet":
        problems.append(
            f"{where}: pod names change when a pod is replaced; a StatefulSet keeps them, and "
            "with them QRSIGHT_GROUP_INSTANCE_ID and the transactional.id"
        )
    else:
        governing = doc["spec"].get("serviceName")
        headless = [
            d
            for d in docs
            if d["kind"] == "Service"
            and d["metadata"]["name"] == governing
            and d["spec"].get("clusterIP") == "None"
        ]
        if not headless:
            problems.append(f"{where}: serviceName {governing!r} names no headless Service")
    spec = pod_spec(doc) or {}
    container = next(containers(doc))
    env = {e["name"]: e for e in container.get("env", [])}
    field = (
        env.get("QRSIGHT_GROUP_INSTANCE_ID", {})
        .get("valueFrom", {})
        .get("fieldRef", {})
        .get("fieldPath")
    )
    if field != "metadata.name":
        problems.append(f"{where}: QRSIGHT_GROUP_INSTANCE_ID must be the pod name (metadata.name)")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(
            f"{where}: automountServiceAccountToken must be false (workers never call the "
            "Kubernetes API; no token to steal)"
        )
    return problems


# --- a Kafka cluster: compose layered over the base, Strimzi custom resources ---------------
def merge_compose(base: Mapping[str, Any], override: Mapping[str, Any]) -> Doc:
    """``docker compose -f base -f override`` for what an override file of ours holds:
    mappings merge key by key (environment, depends_on, services), anything else in the
    override replaces the base's."""
    merged: Doc = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_compose(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


STRIMZI_CLUSTER_CONFIG = {
    "default.replication.factor": 3,
    "min.insync.replicas": 2,
    "offsets.topic.replication.factor": 3,
    "transaction.state.log.replication.factor": 3,
    "transaction.state.log.min.isr": 2,
    "unclean.leader.election.enable": False,
}
RACK_SELECTOR = "org.apache.kafka.common.replica.RackAwareReplicaSelector"


def strimzi_problems(
    docs: list[Doc], settings: Settings, topics: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """A Strimzi cluster fit for qrsight: three dual-role KRaft nodes, replicated internal
    topics, rack-aware fetching, reachable where ``settings`` point, and a KafkaTopic per
    entry of ``topics`` (name → partitions, replicas, config) and no other."""
    problems: list[str] = []
    kafka = find(docs, "Kafka")
    name, namespace = kafka["metadata"]["name"], kafka["metadata"].get("namespace")
    spec = kafka["spec"]["kafka"]
    notes = kafka["metadata"].get("annotations", {})
    if (
        notes.get("strimzi.io/kraft") != "enabled"
        or notes.get("strimzi.io/node-pools") != "enabled"
    ):
        problems.append("Kafka: KRaft and node pools must be enabled (annotations)")
    for key, want in STRIMZI_CLUSTER_CONFIG.items():
        if spec.get("config", {}).get(key) != want:
            problems.append(f"Kafka: config {key} must be {want}")
    if spec.get("config", {}).get("replica.selector.class") != RACK_SELECTOR or not spec.get(
        "rack", {}
    ).get("topologyKey"):
        problems.append("Kafka: rack-aware fetching needs rack.topologyKey and the selector")
    pools = [d for d in docs if d["kind"] == "KafkaNodePool"]
    pool_nodes = sum(
        p["spec"]["replicas"]
        for p in pools
        if p["metadata"].get("labels", {}).get("strimzi.io/cluster") == name
        and {"broker", "controller"} <= set(p["spec"]["roles"])
    )
    if pool_nodes < 3:
        problems.append(f"KafkaNodePool: {pool_nodes} broker+controller nodes, need 3")
    servers = (settings.kafka_bootstrap or "").split(",")
    ports = {int(listener["port"]) for listener in spec.get("listeners", [])}
    for server in servers:
        host, _, port = server.rpartition(":")
        if host.split(".")[:2] != [f"{name}-kafka-bootstrap", namespace] or int(port) not in ports:
            problems.append(f"Kafka: {server} is not {name}'s bootstrap service and listener")
    limit = int(spec.get("config", {}).get("message.max.bytes", 1048588))
    found = {}
    for doc in docs:
        if doc["kind"] != "KafkaTopic":
            continue
        where = f"KafkaTopic/{doc['metadata']['name']}"
        labels = doc["metadata"].get("labels", {})
        if (
            labels.get("strimzi.io/cluster") != name
            or doc["metadata"].get("namespace") != namespace
        ):
            problems.append(f"{where}: not in Kafka {name}'s namespace with its cluster label")
        topic = doc["spec"].get("topicName", doc["metadata"]["name"])
        found[topic] = {
            "partitions": doc["spec"]["partitions"],
            "replicas": doc["spec"]["replicas"],
            "config": {k: str(v) for k, v in doc["spec"].get("config", {}).items()},
        }
        if int(found[topic]["config"].get("max.message.bytes", 0)) > limit:
            problems.append(f"{where}: max.message.bytes over the brokers' message.max.bytes")
    for topic in sorted(set(topics) | set(found)):
        if found.get(topic) != topics.get(topic):
            problems.append(f"topic {topic}: {found.get(topic)} != {topics.get(topic)}")
    return problems


Acl = tuple[str, str, str, str]  # Strimzi's resource type, name, patternType, operation


def strimzi_security_problems(docs: list[Doc], acls: Mapping[str, set[Acl]]) -> list[str]:
    """A secured Strimzi cluster for qrsight: every listener TLS + SCRAM-SHA-512, the simple
    authorizer, the User Operator watching the namespace of the KafkaUsers and of qrsight's
    pods, a SCRAM KafkaUser per entry of ``acls`` (user → its ACLs) holding exactly those
    ACLs and no other user, and each pod that logs in reading its user's password from
    the secret the User Operator makes for that user (same name, key ``password``)."""
    problems: list[str] = []
    kafka = find(docs, "Kafka")
    name, spec = kafka["metadata"]["name"], kafka["spec"]
    for listener in spec["kafka"].get("listeners", []):
        auth = (listener.get("authentication") or {}).get("type")
        if listener.get("tls") is not True or auth != "scram-sha-512":
            problems.append(f"Kafka: listener {listener['name']} is not TLS + scram-sha-512")
    if (spec["kafka"].get("authorization") or {}).get("type") != "simple":
        problems.append("Kafka: authorization must be type simple")
    watched = ((spec.get("entityOperator") or {}).get("userOperator") or {}).get("watchedNamespace")
    found: dict[str, set[Acl]] = {}
    for kafka_user in (d for d in docs if d["kind"] == "KafkaUser"):
        where = f"KafkaUser/{kafka_user['metadata']['name']}"
        if kafka_user["metadata"].get("labels", {}).get("strimzi.io/cluster") != name:
            problems.append(f"{where}: not labelled for Kafka {name}")
        if kafka_user["metadata"].get("namespace") != watched:
            problems.append(f"{where}: not in the User Operator's namespace {watched}")
        if (kafka_user["spec"].get("authentication") or {}).get("type") != "scram-sha-512":
            problems.append(f"{where}: authentication must be scram-sha-512")
        authorization = kafka_user["spec"].get("authorization") or {}
        if authorization.get("type") != "simple":
            problems.append(f"{where}: authorization must be type simple")
        found[kafka_user["metadata"]["name"]] = {
            (
                rule["resource"]["type"],
                rule["resource"]["name"],
                rule["resource"].get("patternType", "literal"),
                operation,
            )
            for rule in authorization.get("acls", [])
            for operation in rule.get("operations", [rule.get("operation")])
            if rule.get("host", "*") == "*"
        }
    for who in sorted(set(acls) | set(found)):
        if found.get(who) != acls.get(who):
            have, want = sorted(found.get(who, set())), sorted(acls.get(who, set()))
            problems.append(f"user {who}: ACLs {have} != {want}")
    for doc in docs:
        for container in containers(doc):
            env = {e["name"]: e for e in container.get("env", [])}
            user = env.get("QRSIGHT_KAFKA_SASL_USERNAME", {}).get("value")
            if user is None:
                continue
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            ref = (
                env.get("QRSIGHT_KAFKA_SASL_PASSWORD", {})
                .get("valueFrom", {})
                .get("secretKeyRef", {})
            )
            if (ref.get("name"), ref.get("key"), ref.get("optional")) != (user, "password", False):
                problems.append(f"{where}: the password of {user} is not its KafkaUser secret")
            if user not in found:
                problems.append(f"{where}: logs in as {user}, which no KafkaUser defines")
            if doc["metadata"].get("namespace") != watched:
                problems.append(f"{where}: not in the namespace of the KafkaUser secrets")
    return problems
