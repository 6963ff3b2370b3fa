"""Serve's high-throughput mode (serving/high_throughput.py): what an embedded Ray starts with, and that the
suite's app is really served through HAProxy (tests/conftest.py starts the shared Ray the way `raybooth
serve` does)."""

from __future__ import annotations

import csv
import io
import os
import re
import socketserver
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from raybooth.cluster.config import ServeConfig
from raybooth.cluster.runtime import free_port
from raybooth.serving import high_throughput
from raybooth.serving.haproxy_launcher import REAL_BINARY_ENV, haproxy_args, real_binary
from raybooth.serving.high_throughput import PER_INSTANCE_PORTS, high_throughput_env


def test_the_mode_is_rays_two_switches_with_ports_of_its_own(monkeypatch):
    for name in PER_INSTANCE_PORTS:
        monkeypatch.delenv(name, raising=False)
    first, second = high_throughput_env(), high_throughput_env()
    for env in (first, second):
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert env["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] == "1"  # access logs when they happen
        assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30  # Ctrl-C in seconds
        assert len({env[name] for name in PER_INSTANCE_PORTS}) == len(PER_INSTANCE_PORTS)
    # two embedded instances on one machine share no port Ray would fix (it keeps its files per node)
    for name in PER_INSTANCE_PORTS:
        assert first[name] != second[name]
    # and none is a port the kernel could give an outgoing connection before HAProxy binds it
    low, high = high_throughput.ephemeral_port_range()
    assert all(not low <= int(env[name]) <= high for env in (first, second) for name in PER_INSTANCE_PORTS)
    assert {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"} <= set(first)


def test_what_the_user_set_wins_and_off_or_without_haproxy_is_the_python_proxy(monkeypatch, caplog):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    assert high_throughput_env()["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert high_throughput_env(enabled=False) == {}
    assert ServeConfig().ingress.high_throughput  # on by default
    monkeypatch.setattr(high_throughput, "haproxy_binary", lambda: None)
    assert high_throughput_env() == {}
    assert "no haproxy binary" in caplog.text and "Python proxy" in caplog.text


def test_an_explicit_haproxy_path_must_be_an_executable(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "missing"))
    assert high_throughput.haproxy_binary() is None


@pytest.mark.slow
def test_the_suites_app_answers_through_haproxy(serve_app, test_ray_env):
    """Requests to the app's port are HAProxy's: its stats page counts them on Serve's HTTP frontend."""
    stats_url = f"http://127.0.0.1:{test_ray_env['RAY_SERVE_HAPROXY_STATS_PORT']}/stats;csv"

    def frontend_requests() -> int:
        rows = csv.DictReader(io.StringIO(httpx.get(stats_url, timeout=10).text.lstrip("# ")))
        return sum(
            int(r["req_tot"] or 0)
            for r in rows
            if r["pxname"] == "http_frontend" and r["svname"] == "FRONTEND"
        )

    before = frontend_requests()
    for _ in range(3):
        assert httpx.get(f"{serve_app.base_url}/healthz", timeout=10).status_code == 200
    assert frontend_requests() >= before + 3


@pytest.mark.slow
def test_haproxys_backup_is_this_instances_own_python_proxy(serve_app, test_ray_env):
    """Ray's fixed 8500 would make a second embedded instance's HAProxy fall back to the first one's proxy."""
    import ray

    port = test_ray_env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]
    assert port != "8500"
    cfg = Path("/tmp/haproxy-serve", ray.get_runtime_context().get_node_id(), "haproxy.cfg").read_text()
    backups = [
        line.split()[2]
        for line in cfg.splitlines()
        if line.strip().startswith("server ") and "backup" in line
    ]
    assert backups and all(address.endswith(f":{port}") for address in backups), cfg
    # and the Python proxy there is this instance's: it routes to the suite's app
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200


def test_the_launcher_adds_no_splice_once_and_before_the_pids_of_a_reload():
    assert haproxy_args(["-db", "-f", "/x/haproxy.cfg", "-sf", "12", "13"]) == [
        "-dS", "-db", "-f", "/x/haproxy.cfg", "-sf", "12", "13"
    ]  # fmt: skip
    assert haproxy_args(["-dS", "-f", "c"]) == ["-dS", "-f", "c"]


def test_high_throughput_runs_haproxy_through_the_launcher(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    env = high_throughput_env()
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == high_throughput.launcher()
    assert Path(env[REAL_BINARY_ENV]).name == "haproxy"
    # an environment that already carries these (a second instance started from it) keeps the real binary
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", env["RAY_SERVE_HAPROXY_BINARY_PATH"])
    monkeypatch.setenv(REAL_BINARY_ENV, env[REAL_BINARY_ENV])
    assert high_throughput_env()[REAL_BINARY_ENV] == env[REAL_BINARY_ENV]
    # a node started without it (infra/k8s sets only the launcher) finds the haproxy Ray would run
    monkeypatch.delenv(REAL_BINARY_ENV)
    assert real_binary() == env[REAL_BINARY_ENV]
    # and an embedded Ray started on such a node runs that haproxy through the launcher, not the launcher
    assert high_throughput.haproxy_binary() == env[REAL_BINARY_ENV]
    assert high_throughput_env()[REAL_BINARY_ENV] == env[REAL_BINARY_ENV]


class _SlowBackend(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 server that keeps connections alive, answers GET at once and holds a POST for 10 s,
    noting how long until its client (HAProxy) reset or closed the connection."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.gone_after: list[float] = []
        super().__init__(("127.0.0.1", 0), self._Handler)

    class _Handler(socketserver.BaseRequestHandler):
        def handle(self):
            conn, buf = self.request, b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = re.search(rb"content-length: *(\d+)", head, re.I)
                while length and len(buf) < int(length.group(1)):
                    buf += conn.recv(65536)
                buf = buf[int(length.group(1)) if length else 0 :]
                if head.startswith(b"POST"):
                    started = time.monotonic()
                    conn.settimeout(10)
                    try:
                        gone = conn.recv(1) == b""
                    except ConnectionResetError:
                        gone = True
                    except TimeoutError:
                        gone = False
                    if gone:
                        self.server.gone_after.append(time.monotonic() - started)
                        return
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


def test_through_the_launcher_haproxy_lets_the_backend_see_a_client_leave(tmp_path):
    """The options of Ray's config that matter (4 threads, splicing, `http-reuse always`, `abortonclose`) and
    backend connections that earlier clients left idle: each of three clients that leaves is seen by the
    backend within a second or two. Run directly, haproxy 2.8 missed most of them (it kept the connection
    open until the backend's 10 s were up), so all three seen is the launcher's `-dS` at work."""
    backend = _SlowBackend()
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n    nbthread 4\n"
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
        "    option abortonclose\n    option splice-request\n    option splice-response\n"
        "    option http-no-delay\n    option idle-close-on-response\n"
        f"frontend f\n    bind 127.0.0.1:{port}\n    default_backend b\n"
        f"backend b\n    http-reuse always\n    server s 127.0.0.1:{backend.server_address[1]}\n"
    )
    written = config.read_text()
    env = {**os.environ, REAL_BINARY_ENV: high_throughput.haproxy_binary()}
    proc = subprocess.Popen([high_throughput.launcher(), "-db", "-f", str(config)], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(f"{url}/fast", timeout=5)
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        for leaving in range(1, 4):
            assert httpx.get(f"{url}/fast", timeout=5).text == "ok"  # leaves an idle backend connection ...
            with pytest.raises(httpx.ReadTimeout):  # ... which the next client's request reuses
                httpx.post(f"{url}/slow", json={"n": leaving}, timeout=1)
            deadline = time.monotonic() + 8
            while len(backend.gone_after) < leaving and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(backend.gone_after) == leaving and backend.gone_after[-1] < 3, backend.gone_after
        assert config.read_text() == written  # Ray's file, untouched
    finally:
        proc.terminate()
        proc.wait(10)
        backend.shutdown()
