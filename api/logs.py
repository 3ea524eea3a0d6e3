"""The API's logs: qrsight's one format (``core.runtime.logs``) for the app and for gunicorn itself.

Every line logged while a request is served carries its ``request_id`` and ``trace_id``
(``api.app`` binds them); gunicorn's error log and access log go through the same
formatter (``logger_class`` in ``api/gunicorn.conf.py``), and each access line carries the
request's ids too.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from core.runtime import logs
from core.runtime.settings import load_settings

TRACE_ID_ENVIRON = "qrsight.trace_id"  # set by api.app for each request
REQUEST_ID_ENVIRON = "qrsight.request_id"  # ours, never the client's X-Request-ID


class GunicornLogger(Logger):
    """gunicorn's logger with qrsight's format, level and secret masking."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        settings = load_settings()
        for log in (self.error_log, self.access_log):
            if log.handlers:  # gunicorn gave it an output: use ours, same destination stream
                log.handlers[:] = [logs.handler(settings.log_format, logs.secret_values(settings))]

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        atoms = self.atoms_wrapper_class(self.atoms(resp, req, environ, request_time))
        fields = {
            "request_id": environ.get(REQUEST_ID_ENVIRON, "-"),
            "trace_id": environ.get(TRACE_ID_ENVIRON, "-"),
        }
        try:
            self.access_log.info(self.cfg.access_log_format, atoms, extra=fields)
        except Exception:
            self.exception("access log line failed")
