# ruff: noqa: N999  (gunicorn's conventional file name)
"""gunicorn configuration of the qrsight API (``qrsight-api`` runs gunicorn with it).

Worker class: ``gthread``. A /detect request spends nearly all its time *waiting* for
its reply, so each worker runs ``QRSIGHT_API_THREADS`` threads that wait on a
``threading.Event`` while one reply thread per worker reads the worker's reply
partition. Not gevent: librdkafka runs its own C threads and its calls (produce when
the queue is full, poll, flush, metadata requests) block in C, where gevent's
monkey-patching cannot yield; one blocked call stalls the whole hub and with it every
request of the worker, and librdkafka's background threads do not cooperate with
greenlets at all. Real threads cost a little memory and just work.

The worker class is gthread's with paced reads (``api/gworker.py``, ``api/pace.py``):
gthread reads a request's headers with no time limit once its first byte has come, and a
body's reads only with a per-read timeout, so a client dribbling bytes could hold a thread
(and, for /detect, an in-flight slot) for as long as it liked.

Workers are never preloaded (``preload_app = False``): librdkafka's threads do not
survive ``fork``, so each worker imports ``api.wsgi`` and builds its own clients.
Each worker gets a *slot* (``pre_fork``/``post_fork`` below) that picks its partition
of the replies topic (see ``api/slots.py``).

Metrics: ``PROMETHEUS_MULTIPROC_DIR`` is set here (a fresh temporary directory unless
given) before any worker imports prometheus_client; ``child_exit`` marks dead workers.

Back-pressure: every request of a worker, /health included, is served by one pool of
``threads``; ``api/admission.py`` keeps /detect to ``QRSIGHT_API_MAX_IN_FLIGHT`` of them
(default: three quarters), so the liveness and readiness probes always find a free
thread however slow the detection workers are. ``worker_connections`` (gunicorn's 1000)
bounds the connections a worker holds; past it new connections wait in the listen
backlog, so it stays well above the threads.

In each worker (``post_fork``): glibc malloc is tuned to give freed upload buffers back
(``api/memory.py``) and gunicorn's own error pages become the API's JSON errors
(``api/protocol_errors.py``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from api.slots import least_held_slot
from core.runtime.settings import load_settings

_settings = load_settings()

bind = f"{_settings.api_host}:{_settings.api_port}"
workers = _settings.api_workers
threads = _settings.api_threads
# gthread with paced reads: headers and bodies that dribble in are cut off (api/gworker.py)
worker_class = "api.gworker.PacedThreadWorker"
preload_app = False
# A request may wait api_max_timeout_ms for its reply; the worker must outlive that.
timeout = int(_settings.api_max_timeout_ms / 1000) + 30
graceful_timeout = int(_settings.api_max_timeout_ms / 1000) + 5
keepalive = 5
# No gunicornc control socket (gunicorn 25+): its default place, $HOME/.gunicorn, is not
# writable in the image (HOME=/app belongs to root; read-only root file system on
# Kubernetes), so the master logged an ERROR at every start; qrsight does not use it.
control_socket_disable = True
loglevel = _settings.log_level.lower()
accesslog = "-"
errorlog = "-"
# gunicorn's own error and access logs in qrsight's format (QRSIGHT_LOG_FORMAT); each access
# line ends with our request_id and trace_id (api/logs.py), client_request_id is theirs
logger_class = "api.logs.GunicornLogger"
access_log_format = (
    '%(h)s "%(r)s" %(s)s %(b)s ms=%(M)s client_request_id=%({x-request-id}i)s pid=%(p)s'
)

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
if not os.environ.get(_MULTIPROC_ENV):
    os.environ[_MULTIPROC_ENV] = tempfile.mkdtemp(prefix="qrsight-api-metrics-")
    _own_metrics_dir = True
else:
    os.makedirs(os.environ[_MULTIPROC_ENV], exist_ok=True)
    _own_metrics_dir = False


def on_starting(server: Any) -> None:
    """Start with an empty metrics directory (stale files would add old counts)."""
    path = os.environ[_MULTIPROC_ENV]
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
    server.log.info("metrics dir=%s workers=%s threads=%s", path, workers, threads)


def pre_fork(server: Any, worker: Any) -> None:
    """In the master: give the new worker the slot the fewest live workers hold (during a
    reload the old workers still run: see ``api/slots.py``)."""
    taken = [getattr(w, "qrsight_slot", -1) for w in server.WORKERS.values()]
    worker.qrsight_slot = least_held_slot(taken, server.num_workers)


def post_fork(server: Any, worker: Any) -> None:
    """In the worker, before it imports the app: record its slot, tune malloc, JSON errors."""
    from api import protocol_errors
    from api.memory import tune_malloc
    from api.slots import set_process_slot

    set_process_slot(worker.qrsight_slot)
    if _settings.api_malloc_tuning:
        tune_malloc()
    protocol_errors.install()
    server.log.info("worker pid=%s slot=%s", worker.pid, worker.qrsight_slot)


def worker_exit(server: Any, worker: Any) -> None:
    """Close the worker's Kafka clients (flush what is queued)."""
    extensions = getattr(getattr(worker, "wsgi", None), "extensions", {})
    state = extensions.get("qrsight")
    if state is not None:
        state.replies.close()
    from core.runtime.telemetry import tracing

    tracing().shutdown()  # export the spans still buffered


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _own_metrics_dir:
        shutil.rmtree(os.environ[_MULTIPROC_ENV], ignore_errors=True)
