"""Container HEALTHCHECK: exit 0 when this container's qrsight process is live.

One image runs either the workers (``/healthz`` on ``QRSIGHT_METRICS_PORT``) or the API
(``/api/v1/health`` on ``QRSIGHT_API_PORT``); whichever answers 200 makes the container
healthy. Ports come from the same settings the processes read.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from core.runtime.settings import load_settings

API_HEALTH = "/api/v1/health"
WORKER_HEALTH = "/healthz"


def urls() -> list[str]:
    settings = load_settings()
    found = [f"http://127.0.0.1:{settings.api_port}{API_HEALTH}"]
    if settings.metrics_port:
        found.append(f"http://127.0.0.1:{settings.metrics_port}{WORKER_HEALTH}")
    return found


def live(url: str, timeout_s: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    checked = urls()
    if any(live(url) for url in checked):
        return 0
    sys.stderr.write(f"unhealthy: no 200 from {', '.join(checked)}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
