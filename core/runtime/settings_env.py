"""How settings are read from ``QRSIGHT_*`` environment variables: the names, the
``QRSIGHT_KAFKA__*`` pass-through, and errors that name the variable to fix.

Written by hand rather than with pydantic-settings: an empty variable means the default,
a list is comma-separated (not JSON), an unknown ``QRSIGHT_*`` name is logged, and every
validation error names the environment variable; the loader's tests
(``tests/unit/test_settings.py``) pin that behaviour.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from core.runtime.errors import ConfigError

ENV_PREFIX = "QRSIGHT_"
KAFKA_PASSTHROUGH_PREFIX = "QRSIGHT_KAFKA__"
KAFKA_EXTRA_FIELD = "kafka_extra"  # the field the pass-through fills
SECRET_PROPERTY_WORDS = ("key", "password", "secret", "token", "credential")
SECRET_FILE_SUFFIX = "_FILE"
# Secrets that may come from a file (``<VARIABLE>_FILE``), as container secrets are mounted.
SECRET_FILE_FIELDS = ("kafka_sasl_password", "auth_jwt_secret", "schema_registry_basic_auth")

logger = logging.getLogger("core.runtime.settings")  # the name operators filter on

Model = TypeVar("Model", bound=BaseModel)


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return ENV_PREFIX + field.upper()


def is_secret_property(prop: str) -> bool:
    """Whether a librdkafka property's value must never be shown (``ssl.key.password``, …)."""
    name = prop.lower()
    return any(word in name for word in SECRET_PROPERTY_WORDS)


def kafka_passthrough(environ: Mapping[str, str]) -> dict[str, str]:
    """librdkafka properties given as ``QRSIGHT_KAFKA__<PROPERTY>``: the part after the
    double underscore is lower-cased and ``_`` becomes ``.``."""
    props: dict[str, str] = {}
    for name, value in environ.items():
        if name.upper().startswith(KAFKA_PASSTHROUGH_PREFIX):
            prop = name[len(KAFKA_PASSTHROUGH_PREFIX) :].lower().replace("_", ".")
            if prop:
                props[prop] = value
    return props


def load_from_env(
    model: type[Model], environ: Mapping[str, str] | None, overrides: Mapping[str, Any]
) -> Model:
    """Build ``model`` from ``environ`` (default ``os.environ``), ``overrides`` winning.

    Raises :class:`ConfigError` naming each variable to fix."""
    env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
    secret_files = [name for name in SECRET_FILE_FIELDS if name in model.model_fields]
    values: dict[str, Any] = {
        name: read_secret_file(env_name(name) + SECRET_FILE_SUFFIX, env)
        for name in secret_files
        if env.get(env_name(name) + SECRET_FILE_SUFFIX)
    }
    values.update(
        (name, env[env_name(name)])
        for name in model.model_fields
        if name != KAFKA_EXTRA_FIELD and env.get(env_name(name), "") != ""
    )
    if KAFKA_EXTRA_FIELD in model.model_fields:
        values[KAFKA_EXTRA_FIELD] = kafka_passthrough(env)
    values.update(overrides)
    known = {env_name(name) for name in model.model_fields}
    _warn_unknown(env, known | {env_name(name) + SECRET_FILE_SUFFIX for name in secret_files})
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {_problems(exc)}") from exc


def read_secret_file(variable: str, env: Mapping[str, str]) -> str:
    """The secret in the file ``variable`` names, without its final newline."""
    path = Path(env[variable]).expanduser()
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(
            f"invalid settings: {variable}: cannot read {path}: {exc.strerror}"
        ) from exc


def _warn_unknown(env: Mapping[str, str], known: set[str]) -> None:
    """A misspelt ``QRSIGHT_*`` name would otherwise be silently ignored."""
    unknown = sorted(
        k
        for k in env
        if k.startswith(ENV_PREFIX)
        and k not in known
        and not k.startswith(KAFKA_PASSTHROUGH_PREFIX)
    )
    if unknown:
        logger.warning("ignoring unknown settings names=%s", ",".join(unknown))


def _problems(exc: ValidationError) -> str:
    """Each error with its variable's name; a cross-setting rule's message names its own."""
    return "; ".join(
        f"{ENV_PREFIX}{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
        if err["loc"]
        else err["msg"].removeprefix("Value error, ")
        for err in exc.errors()
    )
