"""API keys: loaded from an env var or a file, kept only as SHA-256 digests, compared in constant time.

The driver that builds the app reads the keys and passes *digests* to the ingress, so the keys never
appear in the Serve deployment config, the dashboard or logs; a replica also reads the env var and file
itself, so a RayService whose pods get the keys from a Secret works without the driver having them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from serve.config import ServeConfig


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(cfg: ServeConfig) -> list[str]:
    """The keys in `$api_keys_env` (comma-separated), then `api_key_file` (one per line, `#` comments).

    The driver needs them in clear only to hand one to its own smoke client; everything else keeps
    digests.
    """
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",")]
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file():
            raise ValueError(f"serve.api_key_file {path} does not exist")  # a typo must not pass silently
        keys += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [k for k in keys if k and not k.startswith("#")]


def load_key_digests(cfg: ServeConfig) -> list[str]:
    """Digests of the keys `load_keys` reads."""
    return sorted({digest(k) for k in load_keys(cfg)})


def bearer_ok(authorization: str | None, digests: list[str]) -> bool:
    """True when the `Authorization: Bearer <key>` header carries one of the keys."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    presented = digest(token.strip())
    # Compare against every digest (no early exit) so timing reveals nothing about which key matched.
    found = False
    for d in digests:
        found |= hmac.compare_digest(presented, d)
    return found
