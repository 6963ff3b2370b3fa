"""API keys: read from an environment variable or a secret file, compared as SHA-256 digests.

    RAYBOOTH_API_KEYS=key1,key2 raybooth serve            # or api_keys_file: /run/secrets/raybooth-keys

Keys never travel in the Serve config: the app builder reads them where it runs and hands the
ingress only their digests. With any key configured every route but `/healthz` needs
`Authorization: Bearer <key>` (the docs and `/openapi.json` too); with none, the server refuses to listen
on anything but loopback, and, since a web page in the user's browser can reach loopback, it also
refuses requests whose `Host` is not a loopback name or the bound address (DNS rebinding) and POSTs
that are not `Content-Type: application/json` (a cross-site form or `text/plain` fetch needs no CORS
preflight; a JSON one does, and the server answers no preflight).

    edge_refusal("POST", "evil.example:8000", "text/plain", keys_enabled=False, bound_host="127.0.0.1")
    # -> APIError 421 naming the Host rule
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from raybooth.errors import ConfigError
from raybooth.openai.errors import APIError

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def load_api_keys(env_var: str, file: str | None) -> list[str]:
    """Keys from `$env_var` (comma-separated) plus `file` (one per line, `#` comments allowed)."""
    keys = [k.strip() for k in os.environ.get(env_var, "").split(",")]
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ConfigError(f"api_keys_file {path} does not exist; create it or unset api_keys_file")
        keys += [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [k for k in keys if k]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_digests(env_var: str, file: str | None) -> list[str]:
    return [digest(k) for k in load_api_keys(env_var, file)]


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_allowed(host: str | None, digests: list[str]) -> None:
    """Refuse a non-loopback address without keys: that would be an open endpoint on the network."""
    if not digests and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host!r} without API keys: set RAYBOOTH_API_KEYS (or api_keys_env / "
            "api_keys_file) or bind to 127.0.0.1"
        )


class KeyChecker:
    """Checks `Authorization` headers against the digests; constant-time per key."""

    def __init__(self, digests: list[str]):
        self.digests = list(digests)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def allows(self, authorization: str | None) -> bool:
        if not self.enabled:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        presented = digest(token.strip())
        # Compare against every key (no early exit) so timing does not reveal which one matched.
        return sum(hmac.compare_digest(presented, d) for d in self.digests) > 0


def host_name(host_header: str | None) -> str | None:
    """The name in a `Host` header (`127.0.0.1:8000`, `[::1]:8000`, `localhost`), lower-case; None if absent
    or malformed."""
    if not host_header:
        return None
    try:
        return urlsplit(f"//{host_header.strip()}").hostname
    except ValueError:
        return None


def is_json_content_type(content_type: str | None) -> bool:
    """`application/json`, with or without parameters such as `; charset=utf-8`."""
    return (content_type or "").split(";", 1)[0].strip().lower() == "application/json"


def edge_refusal(
    method: str,
    host_header: str | None,
    content_type: str | None,
    *,
    keys_enabled: bool,
    bound_host: str | None,
) -> APIError | None:
    """Why a request to the keyless (loopback) server is refused before auth and parsing, or None.

    With keys set both checks are off: a browser cannot attach the Bearer key to a cross-site request,
    and a server behind an ingress is reached under names this process cannot know."""
    if keys_enabled:
        return None
    name = host_name(host_header)
    bound = (bound_host or "").strip("[]").lower()
    if name is None or not (is_loopback(name) or name == bound):
        return APIError(
            421,
            f"Host {(host_header or '')[:80]!r} is not this server: without API keys only loopback names "
            f"(localhost, 127.0.0.1, [::1]) and the bound address are accepted; set RAYBOOTH_API_KEYS to "
            "serve under other names",
            code="invalid_host",
        )
    if method.upper() == "POST" and not is_json_content_type(content_type):
        return APIError(
            415,
            f"Content-Type {(content_type or '')[:80]!r} is not accepted; send the body as "
            "Content-Type: application/json",
            code="unsupported_media_type",
        )
    return None
