"""What the server exposes, and to whom: the keyless server's Host and Content-Type rules (DNS rebinding,
cross-site simple requests), and the docs, schema and stats behind the key when keys are set.

.venv/bin/python -m pytest tests/serving/test_exposure.py            # the Serve tests are marked slow
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from raybooth.serving.auth import edge_refusal, host_name, is_json_content_type

CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# --------------------------------------------------------------------------------------------------
# The rules, without a server
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [("127.0.0.1:8000", "127.0.0.1"), ("[::1]:8000", "::1"), ("LocalHost", "localhost"), ("", None)],
)
def test_host_name_reads_the_name_out_of_a_host_header(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "127.0.0.1"])
def test_the_keyless_server_accepts_loopback_hosts_and_json(host):
    assert edge_refusal("POST", host, "application/json", keys_enabled=False, bound_host="127.0.0.1") is None
    assert edge_refusal("GET", host, None, keys_enabled=False, bound_host="127.0.0.1") is None


@pytest.mark.parametrize("host", ["evil.example:8000", "127.0.0.1.nip.io", "10.0.0.5:8000", "", None])
def test_the_keyless_server_refuses_other_hosts_with_421(host):
    err = edge_refusal("GET", host, None, keys_enabled=False, bound_host="127.0.0.1")
    assert err is not None and err.status == 421 and err.code == "invalid_host"
    assert "RAYBOOTH_API_KEYS" in err.message  # the fix is named


def test_the_bound_address_is_an_accepted_host():
    assert edge_refusal("GET", "127.0.0.2:9000", None, keys_enabled=False, bound_host="127.0.0.2") is None


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None, ""]
)
def test_the_keyless_server_refuses_non_json_posts_with_415(content_type):
    err = edge_refusal("POST", "127.0.0.1:8000", content_type, keys_enabled=False, bound_host="127.0.0.1")
    assert err is not None and err.status == 415 and "application/json" in err.message


def test_json_content_type_allows_parameters():
    assert is_json_content_type("Application/JSON; charset=utf-8")
    assert not is_json_content_type("application/jsonp")


def test_with_keys_the_host_and_content_type_rules_are_off():
    # Behind a cluster ingress the names are unknown here, and the Bearer key already stops a browser.
    assert (
        edge_refusal("POST", "api.example.com", "text/plain", keys_enabled=True, bound_host="0.0.0.0") is None
    )


# --------------------------------------------------------------------------------------------------
# Against the real Serve app
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/v1/internal/stats"])
def test_with_keys_docs_schema_and_stats_need_the_key(serve_app, path):
    refused = httpx.get(f"{serve_app.base_url}{path}", timeout=60)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.headers["www-authenticate"] == "Bearer"
    allowed = httpx.get(f"{serve_app.base_url}{path}", headers=serve_app.auth, timeout=60)
    assert allowed.status_code == 200


@pytest.mark.slow
def test_openapi_publishes_the_real_request_bodies(serve_app):
    doc = httpx.get(f"{serve_app.base_url}/openapi.json", headers=serve_app.auth, timeout=60).json()
    schemas = doc["components"]["schemas"]
    for path, model in [
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/images/generations", "ImageGenerationRequest"),
    ]:
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
    assert {"messages", "max_tokens", "stream"} <= set(schemas["ChatCompletionRequest"]["properties"])
    assert "prompt" in schemas["ImageGenerationRequest"]["required"]
    # Every reference resolves inside the document (pydantic's own `#/$defs/...` would not).
    refs = {ref for ref in _refs(doc)}
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs), refs


def _refs(node) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


@pytest.fixture
def keyless_app(serve_app) -> Iterator[str]:
    """The module's app redeployed with no API keys (only the ingress restarts)."""
    with serve_app.redeployed(serve_app.settings, api_keys=False):
        yield serve_app.base_url


@pytest.mark.slow
def test_the_keyless_server_enforces_host_and_content_type(keyless_app):
    url = f"{keyless_app}/v1/chat/completions"
    raw = json.dumps(CHAT_BODY)
    # A cross-site "simple" request: text/plain needs no CORS preflight, so a web page could send it.
    plain = httpx.post(url, content=raw, headers={"Content-Type": "text/plain"}, timeout=60)
    assert plain.status_code == 415 and plain.headers["content-type"] == "application/json"
    assert plain.json()["error"]["code"] == "unsupported_media_type"
    # DNS rebinding: the browser sends the attacker's name as Host to 127.0.0.1.
    rebound = httpx.post(url, json=CHAT_BODY, headers={"Host": "evil.example:8000"}, timeout=60)
    assert rebound.status_code == 421 and rebound.json()["error"]["code"] == "invalid_host"
    models = httpx.get(f"{keyless_app}/v1/models", headers={"Host": "evil.example"}, timeout=60)
    assert models.status_code == 421  # reads are refused too: a rebound page could read the answers
    ok = httpx.post(url, json=CHAT_BODY, timeout=120)
    assert ok.status_code == 200 and ok.json()["object"] == "chat.completion"
    assert httpx.get(f"{keyless_app}/openapi.json", timeout=60).status_code == 200  # no keys: docs open
