"""Optional JWT bearer authentication (PyJWT).

Keys come from settings only: ``QRSIGHT_AUTH_JWT_SECRET`` (HS256) and/or
``QRSIGHT_AUTH_JWT_PUBLIC_KEY`` (RS256, PEM text or a file path). There is no default
key: enabling auth without one refuses to start. ``exp`` is required; ``aud`` and
``iss`` are checked when configured. A token's algorithm picks the key, and only the
algorithms with a configured key are accepted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from flask import g, request

from core.errors import ConfigError, UnauthorizedError
from core.settings import Settings, env_name

logger = logging.getLogger(__name__)

REALM = "qrsight"


@dataclass(frozen=True)
class JwtVerifier:
    keys: dict[str, Any]  # algorithm -> key
    audience: str | None
    issuer: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtVerifier | None:
        """The verifier, or None when auth is off; ConfigError when it is on without a key."""
        if not settings.auth_enabled:
            return None
        keys: dict[str, Any] = {}
        if settings.auth_jwt_secret is not None and settings.auth_jwt_secret.get_secret_value():
            keys["HS256"] = settings.auth_jwt_secret.get_secret_value()
        if settings.auth_jwt_public_key:
            keys["RS256"] = load_public_key(settings.auth_jwt_public_key)
        if not keys:
            raise ConfigError(
                f"{env_name('auth_enabled')} is on but no key is set: set "
                f"{env_name('auth_jwt_secret')} (HS256) or {env_name('auth_jwt_public_key')} "
                "(RS256 PEM or file)"
            )
        return cls(keys, settings.auth_jwt_audience, settings.auth_jwt_issuer)

    def verify(self, token: str) -> dict[str, Any]:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            if alg not in self.keys:
                raise UnauthorizedError(
                    f"token algorithm {alg!r} is not accepted",
                    challenge=challenge("invalid_token", "algorithm not accepted"),
                )
            claims: dict[str, Any] = jwt.decode(
                token,
                self.keys[alg],
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise UnauthorizedError(
                f"invalid token: {exc}", challenge=challenge("invalid_token", str(exc))
            ) from exc
        return claims


def load_public_key(value: str) -> str:
    """PEM text as is, else the file it names."""
    if value.lstrip().startswith("-----BEGIN"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{env_name('auth_jwt_public_key')} is neither PEM text nor a readable file: {path}"
        )
    return path.read_text()


def challenge(error: str | None = None, description: str | None = None) -> str:
    parts = [f'realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append('error_description="{}"'.format(description.replace('"', "'")))
    return "Bearer " + ", ".join(parts)


def authenticate(verifier: JwtVerifier) -> None:
    """Check the request's bearer token; remember its subject for rate limiting."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("a bearer token is required", challenge=challenge())
    claims = verifier.verify(token.strip())
    g.auth_subject = str(claims.get("sub") or "")
