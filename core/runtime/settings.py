"""One frozen settings object per process, built from ``QRSIGHT_*`` environment variables.

Every knob of qrsight lives here, so the README table, the deploy manifests and the
code cannot drift apart (``python -m core.runtime.settings`` prints the table; a test checks
the README and the manifests against it).

Any librdkafka property can be passed through with ``QRSIGHT_KAFKA__<PROPERTY>``:
the part after the double underscore is lower-cased and ``_`` becomes ``.``, so
``QRSIGHT_KAFKA__SSL_CA_LOCATION=/etc/ca.pem`` sets ``ssl.ca.location``.

A secret can also be read from a file, as Docker and Kubernetes mount secrets:
``QRSIGHT_KAFKA_SASL_PASSWORD_FILE=/run/secrets/kafka-password`` (likewise
``QRSIGHT_AUTH_JWT_SECRET_FILE`` and ``QRSIGHT_SCHEMA_REGISTRY_BASIC_AUTH_FILE``); the
variable itself wins when both are set.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

# The loader, the table and the rules live beside this module (settings_env,
# settings_table, settings_rules); the names callers import from here are re-exported.
from core.runtime.settings_env import (
    ENV_PREFIX,
    KAFKA_PASSTHROUGH_PREFIX,
    SECRET_FILE_FIELDS,
    SECRET_FILE_SUFFIX,
    SECRET_PROPERTY_WORDS,
    env_name,
    is_secret_property,
    kafka_passthrough,
    load_from_env,
)
from core.runtime.settings_rules import MAX_POLL_INTERVAL_MS, check_watchdog_before_eviction
from core.runtime.settings_table import markdown_table as _markdown_table

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "models" / "qrsight-qr-v3.onnx"
DEFAULT_VERIFIER = REPO_ROOT / "models" / "qrsight-qrverify-v2.onnx"

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_VERIFIER",
    "ENV_PREFIX",
    "KAFKA_PASSTHROUGH_PREFIX",
    "MAX_POLL_INTERVAL_MS",
    "REPO_ROOT",
    "SECRET_FILE_FIELDS",
    "SECRET_FILE_SUFFIX",
    "SECRET_PROPERTY_WORDS",
    "Settings",
    "env_name",
    "is_secret_property",
    "kafka_passthrough",
    "load_settings",
    "markdown_table",
]


class Settings(BaseModel):
    """All of qrsight's settings; build it with :func:`load_settings`."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    # --- Kafka connection -------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        None, description="Kafka `bootstrap.servers` (required by every Kafka client)"
    )
    kafka_port: int = Field(9092, description="port of the local broker `make kafka-up` starts")
    kafka_client_id: str = Field("qrsight", description="Kafka `client.id` prefix")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka `security.protocol`"
    )
    kafka_sasl_mechanism: str | None = Field(
        None, description="Kafka `sasl.mechanism` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, …)"
    )
    kafka_sasl_username: str | None = Field(None, description="Kafka `sasl.username`")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="Kafka `sasl.password` (secret; never logged)"
    )
    kafka_ssl_ca_location: Path | None = Field(
        None,
        description="Kafka `ssl.ca.location`: the PEM file of the CA that signed the brokers' "
        "certificates (unset: the system's CAs); `make kafka-up KAFKA_SECURITY=sasl_ssl` "
        "writes it, with the SASL settings, to `.kafka/clients/<role>.env`",
    )
    kafka_client_rack: str | None = Field(
        None,
        description="Kafka `client.rack`: the zone or rack this process runs in, so that a "
        "cluster with `broker.rack` and `RackAwareReplicaSelector` serves its fetches from a "
        "replica in the same zone (KIP-392)",
    )
    kafka_extra: dict[str, str | SecretStr] = Field(
        default_factory=dict,
        description="any librdkafka property, as `QRSIGHT_KAFKA__<PROPERTY>` (see above); "
        "one whose name says key, password, secret, token or credential is kept secret",
    )
    schema_registry_url: str | None = Field(
        None,
        description="Schema Registry URL; set it to use the Confluent wire format "
        "(else plain schemaless Avro)",
    )
    schema_registry_basic_auth: SecretStr | None = Field(
        None, description="Schema Registry `user:password` (secret)"
    )

    # --- topics -----------------------------------------------------------------------
    topic_images: str = Field("qr.images", description="topic the images are published to")
    topic_detections: str = Field("qr.detections", description="topic of result events")
    topic_replies: str = Field("qr.replies", description="topic of the API's replies")
    topic_dlq: str = Field("qr.images.dlq", description="dead-letter topic for bad input")
    topic_partitions: int = Field(
        6, ge=1, description="partitions of qr.images, qr.detections and the DLQ"
    )
    replies_partitions: int = Field(
        16, ge=1, description="partitions of qr.replies (one per API process slot)"
    )
    replication_factor: int | None = Field(
        None,
        ge=1,
        description="replication factor of new topics (unset: 3 on a cluster of three or "
        "more brokers, else 1)",
    )
    min_insync_replicas: int | None = Field(
        None,
        ge=1,
        description="`min.insync.replicas` of new topics: replicas that must have a write "
        "before it is acknowledged (unset: 2 when the replication factor is 3 or more, "
        "else 1)",
    )
    replies_retention_ms: int = Field(
        300_000, ge=1000, description="retention of qr.replies (short: replies are ephemeral)"
    )
    detections_retention_ms: int = Field(
        604_800_000, description="retention of qr.detections and the DLQ (-1 keeps forever)"
    )

    # --- image intake -----------------------------------------------------------------
    max_image_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="largest image accepted, in bytes; drives every Kafka size limit",
    )
    max_image_side: int = Field(8192, ge=32, description="largest width or height, pixels")
    max_image_pixels: int = Field(
        40_000_000, ge=1024, description="largest width x height (decompression-bomb guard)"
    )

    # --- model ------------------------------------------------------------------------
    model_path: Path = Field(DEFAULT_MODEL, description="ONNX detector to load")
    verifier_path: Path | None = Field(
        DEFAULT_VERIFIER,
        description="ONNX crop verifier: a QR box whose payload was not read is kept only "
        "if it confirms it, and its confidence becomes the calibrated probability of a code "
        "(1.0 once read); used with the detector it was trained for (`off` = none)",
    )
    onnx_providers: list[str] | None = Field(
        None,
        description="ONNX Runtime providers in order, comma-separated "
        "(default: TensorRT → CUDA → CPU, whatever is installed)",
    )
    ort_intra_threads: int | None = Field(
        None,
        ge=0,
        description="ONNX Runtime intra-op threads (0 = ORT default: one per core; "
        "unset: 0 on the CPU, 1 when the detector runs on CUDA/TensorRT)",
    )
    ort_inter_threads: int = Field(1, ge=0, description="ONNX Runtime inter-op threads")
    ort_solo_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads for a batch of one image, in a second "
        "session, used while no other worker of the host has a batch in hand and they used "
        "under half a core over the last second (CPU only; 0 = off): at low load a lone image "
        "uses the cores the other workers leave idle. `make up` sets it to the host's cores "
        "when it runs more than one worker (bench/README.md); a worker alone in its "
        "container or pod has no neighbours to share with, so it stays off there",
    )
    ort_solo_min_run_ms: float = Field(
        25.0,
        ge=0,
        description="a solo session (`QRSIGHT_ORT_SOLO_THREADS`) is kept only for a model "
        "whose lone image takes at least this long on the worker's own session, timed at "
        "load (0 = always): a short run gains a few ms from more threads and loses them to "
        "the API and the broker sharing the cores (bench/README.md)",
    )
    pad_batch: bool | None = Field(
        None,
        description="pad every inference batch to `QRSIGHT_MAX_BATCH` images, so the model "
        "sees one input shape (unset: on for CUDA/TensorRT, where each new batch size costs "
        "a kernel search or engine build of 0.5 to 3 s; off on CPU)",
    )
    imgsz: int | None = Field(
        None, description="inference size (default: the model's metadata, else 640)"
    )
    rect: bool = Field(
        False,
        description="on the CPU, run each batch at the smallest input, in multiples of the "
        "model's stride, that holds its letterboxed images (Ultralytics' minimal-padding "
        "letterbox) instead of the square `QRSIGHT_IMGSZ`: a 16:9 frame runs at 416x256, "
        "about 30 % less inference; off by default: the shipped model, trained on square "
        "inputs, then boxed one more of the 960 negative images of its synthetic test set "
        "and found two fewer of 640 codes in small photos (models/README.md); CUDA and "
        "TensorRT keep one shape",
    )
    scaleup: bool = Field(
        True,
        description="enlarge an image smaller than the inference size to fill it "
        "(Ultralytics' `scaleup`); off, a small image runs at its own size (and a GPU "
        "worker letterboxes on the host), cheaper but the shipped model then finds fewer "
        "small codes (models/README.md)",
    )
    conf_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="confidence threshold (default: per model layout)"
    )
    iou_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="NMS IoU threshold (default: per model layout)"
    )
    max_detections: int = Field(100, ge=1, description="most detections kept per image")
    decode_payloads: bool = Field(True, description="read QR payloads with zxing-cpp")
    reduced_decode: bool = Field(
        True,
        description="decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when it "
        "stays at least twice the model input; payloads are still read from "
        "full-resolution crops",
    )
    read_whole_image: bool = Field(
        True,
        description="when reading payloads, also read the whole image and add the QR codes "
        "the detector missed (confidence 1.0)",
    )
    other_symbols: bool = Field(
        True,
        description="drop a QR box whose payload was not read when zxing-cpp reads an Aztec, "
        "Data Matrix, MaxiCode or PDF417 symbol covering at least half of it",
    )
    structure_cap: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="the most confidence a QR box whose payload was not read gets when its "
        "crop shows no QR finder patterns (three at the corners, or two of one code): 0.5 "
        "keeps such a box at the verifier's threshold, a lower value drops it, 1 turns the "
        "check off",
    )
    structure_veto: bool = Field(
        True,
        description="drop (instead of capping) a QR box whose payload was not read when its "
        "crop shows no finder pattern at all, not even one whose outer ring merges with a "
        "dark ground",
    )

    # --- workers ----------------------------------------------------------------------
    consumer_group: str = Field("qrsight-workers", description="consumer group of the workers")
    workers: int | None = Field(
        None,
        ge=1,
        description="worker processes `qrsight-consumer` starts (unset: 1, or "
        "`QRSIGHT_WORKERS_PER_GPU` per visible GPU where onnxruntime has CUDA)",
    )
    max_batch: int = Field(8, ge=1, description="most images per micro-batch")
    max_wait_ms: int = Field(
        5,
        ge=0,
        description="top-up wait: when images are already queued but fewer than "
        "`QRSIGHT_MAX_BATCH`, how long a worker waits for more before running the batch "
        "(a lone image runs at once; 0 = take only what is queued)",
    )
    max_uncommitted: int | None = Field(
        None,
        ge=0,
        description="at-least-once: delivered messages a worker lets await a confirmed offset "
        "commit before it pauses fetching (while the group waits out a dead member, so the "
        "work redone after a rebalance stays bounded; 0 = never pause; unset: twice "
        "`QRSIGHT_MAX_BATCH`)",
    )
    decode_threads: int = Field(2, ge=1, description="threads decoding images per worker")
    batch_memory_mb: int | None = Field(
        None,
        ge=1,
        description="most MiB one batch's images take decoded (judged from their headers, "
        "at the peak of each decode: 6 bytes per pixel for a JPEG, up to 18 for a 16-bit "
        "RGBA PNG): a batch over it "
        "runs in parts, one after another, with the same results; an image over it runs "
        "alone (unset: a quarter of the container's memory limit, 512 MiB without one)",
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="`exactly_once` uses Kafka transactions per batch"
    )
    metrics_port: int = Field(
        9100, ge=0, description="worker metrics/health port (worker i listens on port + i)"
    )
    shutdown_timeout_s: float = Field(
        10.0, gt=0, description="longest a worker takes to finish its batch and leave"
    )
    group_instance_id: str | None = Field(
        None,
        description="static group membership (`group.instance.id`): this host's stable "
        "name, e.g. the StatefulSet pod name; worker i joins as `<id>-<i>` and its "
        "`transactional.id` uses it too (unset: the host name under "
        "`qrsight-consumer`, see `QRSIGHT_STATIC_MEMBERSHIP`)",
    )
    static_membership: bool = Field(
        True,
        description="with `QRSIGHT_GROUP_INSTANCE_ID` unset, `qrsight-consumer` gives its "
        "workers the host name as that identity, so each is a static group member "
        "(`<host>-<i>`) and a restarted worker takes its partitions back without a "
        "rebalance (a second supervisor of the group on the same host gets dynamic "
        "membership); `false`: dynamic membership, a worker stopped for good hands its "
        "partitions on at once instead of after `session.timeout.ms`",
    )
    retry_attempts: int = Field(
        2,
        ge=0,
        description="retries of a batch that fails for a reason other than its input "
        "(with back-off), before its messages are isolated and the failing one is "
        "quarantined to the DLQ",
    )
    retry_backoff_ms: int = Field(
        500, ge=0, description="first back-off between those retries (doubles each time)"
    )
    retry_backoff_max_ms: int = Field(10_000, ge=0, description="longest back-off")
    crash_limit: int = Field(
        3,
        ge=1,
        description="worker deaths (crash, OOM kill, hang; not a stop the worker was told to "
        "make, docs/RELIABILITY.md) on the same messages before they are run one at a time "
        "and the one that kills the worker is quarantined to the DLQ",
    )
    pipeline_timeout_s: float = Field(
        120.0,
        ge=0,
        description="longest one batch's pipeline run (decode, model, payload reading) may "
        "take before the worker counts itself hung: it writes its threads' stacks to stderr "
        "and exits, and the message that hangs it is quarantined like one that crashes it "
        "(0 = never; must stay below the consumer's `max.poll.interval.ms`, 300 s, or the "
        "worker refuses to start)",
    )
    state_dir: Path = Field(
        Path("/tmp/qrsight"),
        description="where each worker notes the batch in hand, to recognise a message "
        "that kills it (an emptyDir on Kubernetes)",
    )

    # --- GPU workers (core/runtime/gpu.py, core/vision/gpu_decode.py, letterbox_graph.py) ---
    image_decoder: Literal["auto", "cpu", "nvimgcodec"] = Field(
        "auto",
        description="JPEG decoding: `nvimgcodec` decodes each batch's JPEGs on the GPU "
        "(NVIDIA nvImageCodec, `pip install 'qrsight[gpu]'`), `cpu` with OpenCV; `auto` = "
        "`nvimgcodec` when the detector runs on CUDA/TensorRT and nvImageCodec loads, else "
        "`cpu`. PNG, WebP, BMP, large JPEGs (decoded reduced, `QRSIGHT_REDUCED_DECODE`) and "
        "any image nvImageCodec fails on take the CPU path; the intake checks are the same",
    )
    device_preprocess: bool | None = Field(
        None,
        description="letterbox and normalize each batch on the inference device (an ONNX "
        "graph fed the images' bytes, its output bound to the detector's input without a "
        "round trip to host memory); unset: on for CUDA/TensorRT, off on the CPU",
    )
    cuda_device: int | None = Field(
        None,
        ge=0,
        description="CUDA device of the workers (unset: worker i runs on visible GPU "
        "i mod the number of GPUs)",
    )
    workers_per_gpu: int = Field(
        2,
        ge=1,
        description="worker processes per visible GPU when `QRSIGHT_WORKERS` is unset and "
        "onnxruntime has CUDA",
    )
    post_threads: int | None = Field(
        None,
        ge=1,
        description="threads reading payloads per worker (unset: 1 on the CPU; on a GPU "
        "host cores / workers, at least 1)",
    )

    # --- API --------------------------------------------------------------------------
    api_host: str = Field("0.0.0.0", description="address gunicorn binds")
    api_port: int = Field(8000, description="port gunicorn binds")
    api_workers: int = Field(2, ge=1, description="gunicorn worker processes")
    api_threads: int = Field(32, ge=1, description="threads per gunicorn worker")
    api_reply_partition: int | None = Field(
        None, ge=0, description="qr.replies partition of this process (default: derived)"
    )
    api_timeout_ms: int = Field(10_000, ge=100, description="default wait for a reply")
    api_max_timeout_ms: int = Field(30_000, ge=100, description="cap on `timeout_ms`")
    api_produce_timeout_ms: int = Field(
        2_000, ge=100, description="longest wait for Kafka to accept a request (then 503)"
    )
    api_partitioner: Literal["least-loaded", "key"] = Field(
        "least-loaded",
        description="which `qr.images` partition a request goes to: `least-loaded` = a "
        "partition of the worker with the fewest of this process's requests in flight (from "
        "the workers' group assignment, described every `QRSIGHT_API_ASSIGNMENT_REFRESH_MS`; "
        "needs Describe on the group, by key until known); `key` = librdkafka's partitioner "
        "on the request id",
    )
    api_assignment_refresh_ms: int = Field(
        2_000,
        ge=100,
        description="how often the API describes the workers' group to learn who owns which "
        "partition (`QRSIGHT_API_PARTITIONER=least-loaded`)",
    )
    api_max_in_flight: int | None = Field(
        None,
        ge=1,
        description="most /detect requests one API process takes at once (uploading or "
        "awaiting their reply); past it 503 with `Retry-After` at once (default: "
        "`QRSIGHT_API_THREADS` less a quarter kept for /health and /ready, and no more than "
        "the container's memory limit allows for images of `QRSIGHT_MAX_IMAGE_BYTES`)",
    )
    api_malloc_tuning: bool = Field(
        True,
        description="give freed upload buffers back to the OS (glibc `mallopt`: fixed mmap "
        "threshold, 2 arenas); off = glibc's defaults",
    )
    api_trusted_proxy_hops: int = Field(
        0,
        ge=0,
        description="reverse proxies in front of the API whose `X-Forwarded-For`/`-Proto` "
        "are trusted for the client address (werkzeug `ProxyFix`); 0 = the socket's address",
    )
    auth_enabled: bool = Field(False, description="require a JWT bearer token")
    auth_jwt_secret: SecretStr | None = Field(
        None, description="HS256 secret (secret; at least 32 bytes)"
    )
    auth_jwt_public_key: str | None = Field(
        None,
        description="public key, PEM text or a file path: RSA (RS256), EC (ES256/384/512 "
        "by curve) or Ed25519 (EdDSA)",
    )
    auth_jwt_audience: str | None = Field(None, description="required `aud` claim")
    auth_jwt_issuer: str | None = Field(None, description="required `iss` claim")
    rate_limit: str = Field(
        "120/minute",
        description="per-client limit on /detect (flask-limiter syntax; `off` disables it)",
    )
    rate_limit_storage_uri: str = Field(
        "memory://", description="flask-limiter storage (e.g. redis://… to share across hosts)"
    )

    # --- logs -------------------------------------------------------------------------
    log_level: str = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`text` (`key=value` lines) or `json` (one object per line); every line "
        "about a request carries its `request_id` and `trace_id`",
    )

    @field_validator("onnx_providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()] or None
        return value

    @field_validator("model_path", mode="after")
    @classmethod
    def _expand_model_path(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("verifier_path", mode="before")
    @classmethod
    def _verifier_off(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "off":
            return None
        return Path(value).expanduser() if isinstance(value, str) else value

    @field_validator("kafka_extra", mode="after")
    @classmethod
    def _hide_secret_properties(cls, value: dict[str, str | SecretStr]) -> dict[str, Any]:
        return {
            prop: SecretStr(v) if is_secret_property(prop) and isinstance(v, str) else v
            for prop, v in value.items()
        }

    @model_validator(mode="after")
    def _watchdog_before_eviction(self) -> Settings:
        check_watchdog_before_eviction(self.pipeline_timeout_s, self.kafka_extra_values())
        return self

    def kafka_extra_values(self) -> dict[str, str]:
        """The ``QRSIGHT_KAFKA__*`` properties with the secret ones revealed, for librdkafka."""
        return {
            prop: v.get_secret_value() if isinstance(v, SecretStr) else v
            for prop, v in self.kafka_extra.items()
        }


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the process's settings from ``environ`` (default ``os.environ``).

    Errors name the environment variable to fix (``core.runtime.settings_env``)."""
    return load_from_env(Settings, environ, overrides)


def markdown_table() -> str:
    """The README's settings table (``core.runtime.settings_table``)."""
    return _markdown_table(Settings, REPO_ROOT)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
