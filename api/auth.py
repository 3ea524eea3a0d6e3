"""Optional JWT bearer authentication (PyJWT), with keys and algorithms pinned per key type.

Keys come from settings only: ``QRSIGHT_AUTH_JWT_SECRET`` (HS256, at least 32 bytes) and/or
``QRSIGHT_AUTH_JWT_PUBLIC_KEY`` (PEM text or a file path). There is no default key:
enabling auth without one refuses to start. Each key accepts exactly one algorithm,
fixed by the key's type when the app starts, never by the token: the secret accepts
HS256; an RSA key (2048 bits or more) RS256; an EC key ES256/ES384/ES512 by its curve; an
Ed25519 key EdDSA. So a token cannot pick how it is checked: ``alg: none``, an HS256 token
"signed" with the public key's PEM (algorithm confusion) and a header whose ``alg`` is not
a string are refused like any bad token, with 401.

``exp`` is required; ``aud`` and ``iss`` are required and checked when configured; ``nbf``
and ``iat`` in the future are refused. Without ``QRSIGHT_AUTH_JWT_AUDIENCE`` and
``QRSIGHT_AUTH_JWT_ISSUER`` a token that any holder of the key minted for another service
(same identity provider, another audience) is accepted too: the app logs a warning at start
(README, "Auth"). The issuer is compared whole (PyJWT >= 2.10.1: 2.10.0 accepted a part of
it, CVE-2024-53861).
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flask import g, request

from core.runtime.errors import ConfigError, UnauthorizedError
from core.runtime.settings import Settings, env_name

logger = logging.getLogger(__name__)

REALM = "qrsight"
# Example files' placeholders (deploy/k8s/base/secret.example.yaml): publicly known keys.
PLACEHOLDER_PREFIXES = ("REPLACE", "CHANGEME", "CHANGE-ME", "YOUR-SECRET")
HS256_MIN_KEY_BYTES = 32  # RFC 7518 section 3.2: a key at least as long as the hash output
RSA_MIN_BITS = 2048
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
DESCRIPTION_CHARS = set(string.ascii_letters + string.digits + " .,:;_-()/'")


@dataclass(frozen=True)
class JwtVerifier:
    keys: dict[str, Any]  # algorithm -> the one key that accepts it
    audience: str | None
    issuer: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtVerifier | None:
        """The verifier, or None when auth is off; ConfigError when it is on without a
        usable key."""
        if not settings.auth_enabled:
            return None
        keys: dict[str, Any] = {}
        secret = settings.auth_jwt_secret.get_secret_value() if settings.auth_jwt_secret else ""
        if secret:
            keys["HS256"] = check_secret(secret)
        if settings.auth_jwt_public_key:
            key = load_public_key(settings.auth_jwt_public_key)
            keys[algorithm_for(key)] = key
        if not keys:
            raise ConfigError(
                f"{env_name('auth_enabled')} is on but no key is set: set "
                f"{env_name('auth_jwt_secret')} (HS256) or {env_name('auth_jwt_public_key')} "
                "(PEM or file)"
            )
        warn_unchecked_claims(settings)
        return cls(keys, settings.auth_jwt_audience, settings.auth_jwt_issuer)

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; UnauthorizedError (401) for anything else."""
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            if not isinstance(alg, str) or alg not in self.keys:
                raise UnauthorizedError(
                    f"token algorithm is not accepted (accepted: {', '.join(sorted(self.keys))})",
                    challenge=challenge("invalid_token", "algorithm not accepted"),
                )
            claims: dict[str, Any] = jwt.decode(
                token,
                self.keys[alg],
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": self.required_claims(), "verify_aud": bool(self.audience)},
            )
        except jwt.PyJWTError as exc:
            raise invalid_token(describe(exc)) from exc
        except (ValueError, TypeError, KeyError) as exc:  # hostile input PyJWT did not expect
            logger.warning("malformed token refused error=%s", type(exc).__name__)
            raise invalid_token("malformed token") from exc
        return claims

    def required_claims(self) -> list[str]:
        required = ["exp"]
        if self.audience:
            required.append("aud")
        if self.issuer:
            required.append("iss")
        return required


def warn_unchecked_claims(settings: Settings) -> None:
    """Say at start when tokens meant for other services would pass (no aud/iss check)."""
    unset = [
        env_name(name)
        for name in ("auth_jwt_audience", "auth_jwt_issuer")
        if not getattr(settings, name)
    ]
    if unset:
        logger.warning(
            "JWT audience/issuer check off: tokens that the key's holders issue for other "
            "services are accepted too; set %s to refuse them",
            " and ".join(unset),
        )


def check_secret(secret: str) -> str:
    """The HS256 secret, refused when it is short or is a PEM key pasted into the wrong
    setting (a public key must never be usable as an HMAC secret)."""
    if secret.lstrip().startswith("-----BEGIN") or secret.lstrip().startswith("ssh-"):
        raise ConfigError(
            f"{env_name('auth_jwt_secret')} holds a PEM/SSH key; a public key goes into "
            f"{env_name('auth_jwt_public_key')}"
        )
    if secret.strip().upper().startswith(PLACEHOLDER_PREFIXES):
        raise ConfigError(
            f"{env_name('auth_jwt_secret')} is still an example's placeholder; set a random "
            "secret (e.g. `openssl rand -hex 32`)"
        )
    if len(secret.encode()) < HS256_MIN_KEY_BYTES:
        raise ConfigError(
            f"{env_name('auth_jwt_secret')} is {len(secret.encode())} bytes; HS256 needs at "
            f"least {HS256_MIN_KEY_BYTES} (RFC 7518 section 3.2)"
        )
    return secret


def load_public_key(value: str) -> Any:
    """The public key object from PEM text, or from the file the setting names."""
    if value.lstrip().startswith("-----BEGIN"):
        text = value
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{env_name('auth_jwt_public_key')} is neither PEM text nor a readable file: {path}"
            )
        text = path.read_text()
    try:
        return load_pem_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{env_name('auth_jwt_public_key')} is not a PEM public key "
            f"(-----BEGIN PUBLIC KEY-----): {exc}"
        ) from exc


def algorithm_for(key: Any) -> str:
    """The one JWS algorithm a public key accepts."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < RSA_MIN_BITS:
            raise ConfigError(
                f"{env_name('auth_jwt_public_key')}: an RSA key of {key.key_size} bits; "
                f"at least {RSA_MIN_BITS} are needed"
            )
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_ALGORITHMS:
        return EC_ALGORITHMS[key.curve.name]
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ConfigError(
        f"{env_name('auth_jwt_public_key')}: a {type(key).__name__} is not supported "
        "(RSA, EC P-256/P-384/P-521 or Ed25519)"
    )


def describe(exc: jwt.PyJWTError) -> str:
    """PyJWT's reason, kept to characters that are safe in a header and a log line."""
    text = "".join(c if c in DESCRIPTION_CHARS else " " for c in str(exc))[:160].strip()
    return text or type(exc).__name__


def invalid_token(reason: str) -> UnauthorizedError:
    return UnauthorizedError(
        f"invalid token: {reason}", challenge=challenge("invalid_token", reason)
    )


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
    subject = claims.get("sub")
    g.auth_subject = subject if isinstance(subject, str) else ""
