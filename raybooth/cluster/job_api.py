"""Reaching a Ray cluster's Jobs API and following a submitted job: status, logs, waiting, stopping.

    raybooth status raysubmit_XXXX --address http://head:8265
    raybooth logs raysubmit_XXXX --address http://head:8265 --follow

    from raybooth.cluster.job_api import describe_job, jobs_api_url
    jobs_api_url("ray://head:10001")            # "http://head:8265": the dashboard port serves the Jobs API
    describe_job("http://head:8265", "raysubmit_XXXX").status

(`cluster/runtime.py`'s `resolve_address` is a different thing: the Ray address a driver connects to.)
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psutil
import requests

from raybooth.errors import UserError

logger = logging.getLogger(__name__)

# The Jobs API listens on the head's dashboard port.
DEFAULT_DASHBOARD_PORT = 8265
# A head that has not answered in this long is down or unreachable; waiting longer only delays the error.
CONNECT_TIMEOUT_S = 5.0
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass(frozen=True)
class SubmittedJobStatus:
    """What `raybooth status` prints about one submitted Ray job (not a batch job's row counts:
    that is `pipelines/progress.JobSummary`)."""

    job_id: str
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    message: str
    entrypoint: str
    start_time_ms: int | None
    end_time_ms: int | None


# --------------------------------------------------------------------------------------------------
# Reaching the cluster
# --------------------------------------------------------------------------------------------------


def jobs_api_url(address: str | None) -> str:
    """The Jobs API URL: `http://head:8265` as given, `head` or `head:8265` with http:// added,
    `ray://head:10001` mapped to the dashboard port; empty: RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS."""
    if not address:
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            value = os.environ.get(var, "")
            if value.startswith(("http://", "https://")):
                address = value
                break
        else:
            raise UserError(
                "no Ray cluster address: pass --address http://<head>:8265 (or set RAY_API_SERVER_ADDRESS)"
            )
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        address = f"http://{urlsplit(address).hostname}:{DEFAULT_DASHBOARD_PORT}"
    elif "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"address {address!r} is not a Ray dashboard URL; pass e.g. http://<head>:8265")
    try:
        port = parts.port
    except ValueError as e:
        raise UserError(f"address {address!r} has a bad port; pass e.g. http://<head>:8265") from e
    if port is None:
        address = f"{parts.scheme}://{parts.netloc}:{DEFAULT_DASHBOARD_PORT}{parts.path}"
    return address


@contextmanager
def _explicit_address_only() -> Iterator[None]:
    # Ray's clients replace the address they are given with RAY_ADDRESS / RAY_API_SERVER_ADDRESS when set;
    # `--address` must win, so hide those two while a client is built.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(url: str, *, timeout_s: float | None = None) -> Any:
    """A JobSubmissionClient for `url`, after a bounded check that something answers there."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s

    hint = f"check the address: the Jobs API is on the head's dashboard port ({DEFAULT_DASHBOARD_PORT})"
    try:
        reply = requests.get(f"{url}/api/version", timeout=timeout_s)
    except requests.Timeout as e:
        raise UserError(
            f"the Ray cluster at {url} does not answer (no reply in {timeout_s:.0f}s); {hint}"
        ) from e
    except requests.RequestException as e:
        raise UserError(f"the Ray cluster at {url} does not answer ({type(e).__name__}); {hint}") from e
    if reply.status_code == 404:
        raise UserError(f"{url} answers but is not a Ray dashboard (no /api/version); {hint}")
    try:
        with _explicit_address_only():
            return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, AuthenticationError) as e:
        raise UserError(f"cannot use the Ray Jobs API at {url}: {e}") from e


def _local_addresses() -> set[str]:
    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}


def host_is_this_machine(host: str) -> bool:
    """True when `host` is loopback or one of this machine's own addresses (no network round trip for IPs)."""
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    local = _local_addresses()
    return all(ipaddress.ip_address(ip.split("%")[0]).is_loopback or ip in local for ip in resolved)


def cluster_runs_here(url: str) -> bool:
    """True when every alive node of the cluster is this machine (a loopback URL can be a port-forward)."""
    from ray.util.state import list_nodes

    try:
        with _explicit_address_only():
            nodes = list_nodes(
                address=url, filters=[("state", "=", "ALIVE")], timeout=10, raise_on_missing_output=False
            )
    except Exception as e:  # state API missing or slow: the address itself is local, trust that
        logger.debug("could not list the nodes of %s (%s); treating it as this machine", url, e)
        return True
    local = _local_addresses()
    return all(node.node_ip in local or ipaddress.ip_address(node.node_ip).is_loopback for node in nodes)


# --------------------------------------------------------------------------------------------------
# Following a job
# --------------------------------------------------------------------------------------------------


def job_status(address: str | None, job_id: str) -> str:
    """The job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return describe_job(address, job_id).status


def describe_job(address: str | None, job_id: str) -> SubmittedJobStatus:
    """Status, message and entrypoint of one job (for `raybooth status`)."""
    url = jobs_api_url(address)
    info = _job_info(connect(url), url, job_id)
    return SubmittedJobStatus(
        job_id=info.submission_id or info.job_id or job_id,
        status=str(getattr(info.status, "value", info.status)),
        message=info.message or "",
        entrypoint=info.entrypoint,
        start_time_ms=info.start_time,
        end_time_ms=info.end_time,
    )


def job_logs(address: str | None, job_id: str) -> str:
    """Everything the job's driver printed so far."""
    url = jobs_api_url(address)
    client = connect(url)
    _job_info(client, url, job_id)
    return client.get_job_logs(job_id)


def follow_logs(address: str | None, job_id: str) -> Iterator[str]:
    """Stream the job's log chunks (each ends in a newline) until the job finishes.

    The address and job id are checked when this is called, so a bad one raises before iteration starts.
    """
    url = jobs_api_url(address)
    client = connect(url)
    _job_info(client, url, job_id)
    return _tail(client, url, job_id)


def _tail(client: Any, url: str, job_id: str) -> Iterator[str]:
    # tail_job_logs is an async generator over a websocket; drive it from a private loop so callers
    # (the CLI, tests) can use a plain for-loop.
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                chunk = loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            except RuntimeError as e:
                raise UserError(
                    f"the log stream of job {job_id} from {url} broke off ({e}); "
                    f"run `raybooth logs {job_id} --address {url}` again"
                ) from e
            yield chunk
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def wait_for_job(
    address: str | None, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0
) -> str:
    """Block until the job reaches a terminal status and return it (SUCCEEDED, FAILED or STOPPED)."""
    url = jobs_api_url(address)
    client = connect(url)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = _job_info(client, url, job_id).status
        if status.is_terminal():
            return str(status.value)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def stop_job(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop the job; False if it had already finished."""
    url = jobs_api_url(address)
    client = connect(url)
    _job_info(client, url, job_id)
    return bool(client.stop_job(job_id))


def _job_info(client: Any, url: str, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise UserError(
                f"there is no job {job_id!r} on the Ray cluster at {url} "
                f"(list its jobs with `ray job list --address {url}`)"
            ) from e
        raise
