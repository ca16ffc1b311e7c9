"""Ray token authentication for clients of a remote cluster's dashboard (Jobs API, State API).

Ray's own SDK adds the `Authorization` header only when the *client* process runs with
`RAY_AUTH_MODE=token`; a laptop talking to a shared cluster usually does not. So raylm finds the token
itself, in the same places and order as Ray's `AuthenticationTokenLoader` (plus the run config's
`cluster.auth_token_file`), and passes it explicitly as a bearer header. Knowing where the token came
from lets a rejected request say which token was wrong instead of printing a stack trace.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.config import UserError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


class AuthError(UserError):
    """The cluster refused our token, or the configured token cannot be read; `str()` says how to fix it."""


@dataclass(frozen=True)
class Token:
    """A bearer token and a human-readable description of where it was found."""

    value: str
    origin: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def _read_token_file(path: Path, origin: str, required: bool) -> Token | None:
    path = path.expanduser()
    if not path.is_file():
        if required:
            raise AuthError(f"auth token file {path} ({origin}) does not exist")
        return None
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise AuthError(f"auth token file {path} ({origin}) is empty")
    return Token(value, f"{origin} {path}")


def find_token(token_file: str | None = None) -> Token | None:
    """The token to present, or None when there is none anywhere.

    Order: the RAY_AUTH_TOKEN environment variable, then `token_file` (cluster.auth_token_file), then
    the file named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. An explicitly named file that is
    missing is an error, since silently falling back would hide a typo.
    """
    env_value = os.environ.get(TOKEN_ENV, "").strip()
    if env_value:
        return Token(env_value, f"environment variable {TOKEN_ENV}")
    if token_file:
        return _read_token_file(Path(token_file), "cluster.auth_token_file", required=True)
    env_path = os.environ.get(TOKEN_PATH_ENV, "").strip()
    if env_path:
        return _read_token_file(Path(env_path), TOKEN_PATH_ENV, required=True)
    return _read_token_file(DEFAULT_TOKEN_FILE, "default token file", required=False)


def client_token(address: str, token_file: str | None = None) -> Token | None:
    """The token for a client of `address`; None when there is none and the cluster may not need one.

    With RAY_AUTH_MODE=token and no token anywhere, Ray's SDK aborts the whole process from C++ while
    building its headers, so that case is refused here, with a message, before the SDK is called.
    """
    token = find_token(token_file) or _kuberay_token(address)
    if token is None and os.environ.get(AUTH_MODE_ENV, "").lower() == "token":
        raise AuthError(explain_rejection(address, f"{AUTH_MODE_ENV}=token is set", None))
    return token


def _kuberay_token(address: str) -> Token | None:
    """Last resort for a KubeRay head Service address (`<cluster>-head-svc[.<namespace>]`): the token Secret
    KubeRay created, read with the local kubeconfig (cluster.kuberay; imported only when it comes to this)."""
    from cluster.kuberay import token_for_address

    return token_for_address(address)


def explain_rejection(address: str, status_message: str, token: Token | None) -> str:
    """One clear message for a 401/403 from the dashboard, naming the token source and how to fix it."""
    if token is None:
        what = (
            f"the Ray cluster at {address} needs an auth token, but none was found "
            f"(looked at ${TOKEN_ENV}, cluster.auth_token_file, ${TOKEN_PATH_ENV} and {DEFAULT_TOKEN_FILE})"
        )
    else:
        what = f"the Ray cluster at {address} rejected the auth token from {token.origin}"
    first_line = status_message.strip().splitlines()[0] if status_message.strip() else ""
    detail = f" ({first_line})" if first_line else ""
    return (
        f"{what}{detail}. Set {TOKEN_ENV} to the cluster's token, or copy the head node's "
        f"{DEFAULT_TOKEN_FILE} to this machine."
    )


def ensure_local_token() -> tuple[Token, Path | None]:
    """The token a cluster started on this host will use; created first when there is none anywhere.

    `ray start --head` with token auth on refuses to start without a token. The new token goes where
    Ray's own `AuthenticationTokenLoader` looks: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, owner-only
    (it grants running arbitrary code on the cluster). Returns the token and the file it was written
    to, or None when an existing token was found.
    """
    found = find_token()
    if found is not None:
        return found, None
    path = Path(os.environ.get(TOKEN_PATH_ENV, "").strip() or DEFAULT_TOKEN_FILE).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes: 256 random bits
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return Token(value, f"new token file {path}"), path


@contextmanager
def ray_auth_errors(address: str) -> Iterator[None]:
    """While joining the Ray cluster at `address`, turn its authentication failures into one AuthError.

    With no token anywhere the join is refused before Ray is called (unless RAY_AUTH_MODE=disabled):
    Ray would otherwise retry for a while, print a C++ warning per attempt and end with a bare
    "Failed to connect". A rejected token names where it came from.
    """
    from ray.exceptions import AuthenticationError

    token = find_token()
    if token is None and os.environ.get(AUTH_MODE_ENV, "").lower() != "disabled":
        raise AuthError(explain_rejection(address, "", None))
    try:
        yield
    except AuthenticationError as exc:
        raise AuthError(explain_rejection(address, str(exc), token)) from None
    except ConnectionError as exc:
        # A rejected token surfaces only in C++ log lines; Python sees a bare "Failed to connect".
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "failed to connect"
        used = f"the auth token from {token.origin}" if token else "no auth token"
        raise AuthError(
            f"could not join the Ray cluster at {address} ({first}). If the address is right, the cluster "
            f"refused {used}: set {TOKEN_ENV} to the cluster's token, or copy the head node's "
            f"{DEFAULT_TOKEN_FILE} to this machine."
        ) from None
