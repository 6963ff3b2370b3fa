"""Serve's high-throughput mode (serving/high_throughput.py): what an embedded Ray starts with, and that the
suite's app is really served through HAProxy (tests/conftest.py starts the shared Ray the way `raybooth
serve` does)."""

from __future__ import annotations

import csv
import io

import httpx
import pytest

from raybooth.cluster.config import ServeConfig
from raybooth.serving import high_throughput
from raybooth.serving.high_throughput import high_throughput_env


def test_the_mode_is_rays_two_switches_with_ports_of_its_own(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_HAPROXY_STATS_PORT", raising=False)
    first, second = high_throughput_env(), high_throughput_env()
    for env in (first, second):
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert env["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] == "1"  # access logs when they happen
        assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30  # Ctrl-C in seconds
        assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != env["RAY_SERVE_HAPROXY_METRICS_PORT"]
    # two embedded instances on one machine share no HAProxy port (Ray keeps its files per node)
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        assert first[name] != second[name]


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
