"""API keys: read from an environment variable or a secret file, compared as SHA-256 digests.

    RAYBOOTH_API_KEYS=key1,key2 raybooth serve            # or api_keys_file: /run/secrets/raybooth-keys

Keys never travel in the Serve config: the app builder reads them where it runs and hands the
ingress only their digests. With any key configured every route but `/healthz` needs
`Authorization: Bearer <key>`; with none, the server refuses to listen on anything but loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from raybooth.errors import ConfigError

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
