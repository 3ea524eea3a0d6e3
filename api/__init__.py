"""The REST facade over Kafka request/reply: ``from api import create_app``.

The package import is kept light on purpose: ``qrsight-api`` and gunicorn's master import
``api.cli``/``api.slots`` before any worker exists, and must not import prometheus_client
(it picks its multiprocess mode when first imported) nor Flask's app machinery.
``create_app`` is loaded from :mod:`api.app` on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from api.app import create_app

        return create_app
    raise AttributeError(f"module 'api' has no attribute {name!r}")
