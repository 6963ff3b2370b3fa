"""One row can never fail the others: poison params, schemas and mid-decode faults end only their own row.

.venv/bin/python -m pytest tests/models/test_engine_containment.py

Each poison row sits in a batch of good rows; the good rows must decode exactly the tokens they decode
alone, and the poison row ends with its own `error` (or, for tiny temperature/top_p, decodes greedily).
"""

from __future__ import annotations

import math

import pytest

from raybooth.models.decoding import SamplingParams
from raybooth.models.vlm_engine import (
    INVALID_REQUEST,
    SERVER_ERROR,
    GenerationRequest,
    VLMEngine,
)
from raybooth.samples import draw_sample_image


@pytest.fixture(scope="module")
def engine(tiny_vlm_path) -> VLMEngine:
    return VLMEngine.from_pretrained(str(tiny_vlm_path), device="cpu")


def request(text: str, images: int = 0, **params) -> GenerationRequest:
    parts = [{"type": "image", "image": draw_sample_image(i)} for i in range(images)]
    parts.append({"type": "text", "text": text})
    return GenerationRequest(messages=[{"role": "user", "content": parts}], params=SamplingParams(**params))


def good_requests() -> list[GenerationRequest]:
    return [
        request("Describe the image.", images=1, max_tokens=10, temperature=0.0),
        request("a photo of a dog " * 6, max_tokens=12, temperature=0.9, seed=7),
        request("What color is the cat?", max_tokens=8, temperature=0.7, top_p=0.8, seed=1),
        request("Answer in JSON.", max_tokens=24, temperature=1.0, seed=3, json_object=True),
    ]


def assert_good_rows_unchanged(engine: VLMEngine, goods, results) -> None:
    for req, result in zip(goods, results, strict=True):
        alone = engine.generate([req])[0]
        assert result.error is None and result.finish_reason in ("stop", "length")
        assert result.token_ids == alone.token_ids and result.text == alone.text


def test_tiny_temperature_and_top_p_decode_greedily_next_to_good_rows(engine):
    # 1e-300 rounds to 0 in float32: logits / temperature and the top_p cut-off used to give
    # torch.multinomial NaN or all-zero weights, which raised and failed every row of the batch.
    greedy = engine.generate([request("a cat", max_tokens=12, temperature=0.0)])[0]
    poison = [
        request("a cat", max_tokens=12, temperature=1e-300, seed=1),
        request("a cat", max_tokens=12, temperature=1.0, top_p=1e-300, seed=2),
        request("a cat", max_tokens=12, temperature=1e-300, top_p=1e-300),
        request("a cat", max_tokens=12, temperature=1e-30, seed=4),  # above float32's 0, below greedy cut-off
    ]
    goods = good_requests()
    results = engine.generate(goods[:2] + poison + goods[2:])
    assert_good_rows_unchanged(engine, goods, results[:2] + results[6:])
    for result in results[2:6]:
        assert result.error is None and result.token_ids == greedy.token_ids


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
        {"not": {}},
    ],
    ids=["ref-root", "mutual-defs", "object-without-base-case", "not-anything"],
)
def test_a_schema_that_admits_nothing_is_that_rows_400_and_the_batch_runs(engine, schema):
    # Before: xgrammar compiled these; the first two masked every token (multinomial raised for the whole
    # batch), the others decoded to max_tokens without ever producing a valid document.
    goods = good_requests()
    results = engine.generate(goods[:2] + [request("json", max_tokens=8, json_schema=schema)] + goods[2:])
    bad = results[2]
    assert bad.finish_reason == "error" and bad.error_type == INVALID_REQUEST
    assert bad.error.startswith("response_format json_schema admits no value")
    assert bad.completion_tokens == 0 and bad.token_ids == []
    assert_good_rows_unchanged(engine, goods, results[:2] + results[3:])


class FailingMatcher:
    """A real grammar matcher that raises on its `fail_at`-th token: stands in for a bug or an xgrammar
    failure in one row's grammar advance (nothing in the shipped code is known to raise there)."""

    def __init__(self, inner, fail_at: int, error: Exception):
        self.inner, self.fail_at, self.error, self.seen = inner, fail_at, error, 0

    def accept_token(self, token: int) -> bool:
        self.seen += 1
        if self.seen == self.fail_at:
            raise self.error
        return self.inner.accept_token(token)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def failing_grammar(engine, monkeypatch):
    """Rows whose schema has title "poison" get a matcher that raises on their third token."""
    real = engine.grammars.matcher

    def matcher(params):
        inner = real(params)
        schema = params.json_schema or {}
        if schema.get("title") == "poison":
            return FailingMatcher(inner, 3, RuntimeError(schema["description"]))
        return inner

    monkeypatch.setattr(engine.grammars, "matcher", matcher)
    return {"title": "poison", "description": "internal detail 0xdeadbeef", "type": "object"}


def test_a_row_that_raises_mid_decode_ends_alone_in_the_stream(engine, failing_grammar):
    goods = good_requests()
    requests = goods[:1] + [request("json", max_tokens=30, json_schema=failing_grammar)] + goods[1:]
    texts = [""] * len(requests)
    last: dict[int, tuple[int, object]] = {}
    for step_no, step in enumerate(engine.generate_stream(requests)):
        for i, delta in enumerate(step):
            if i in last:
                assert delta is None  # nothing after a row's last delta
            elif delta is not None:
                texts[i] += delta.text
                if delta.done:
                    last[i] = (step_no, delta)
    step_no, bad = last[1]
    # The third sampled token raised in the grammar advance: the two before it were delivered.
    assert step_no == 2 and bad.finish_reason == "error" and bad.error_type == SERVER_ERROR
    assert bad.completion_tokens == 2 and bad.token_ids == []
    assert "0xdeadbeef" not in bad.error and "RuntimeError" in bad.error  # no internal text for the user
    alone = [engine.generate([req])[0] for req in goods]
    assert [texts[0]] + texts[2:] == [r.text for r in alone]
    assert all(last[i][1].error is None for i in (0, 2, 3, 4))


def test_nan_logits_in_one_row_fail_only_that_row(engine, monkeypatch):
    real_forward = engine.forward
    calls = []

    def forward(**inputs):
        logits = real_forward(**inputs).clone()
        if not calls:  # the prefill: row 0 of the batch gets NaN logits, as a broken kernel might give it
            logits[0] = math.nan
        calls.append(1)
        return logits

    monkeypatch.setattr(engine, "forward", forward)
    goods = good_requests()
    results = engine.generate([request("nan", max_tokens=8, temperature=0.5, seed=1)] + goods)
    monkeypatch.setattr(engine, "forward", real_forward)
    assert results[0].finish_reason == "error" and results[0].error_type == SERVER_ERROR
    assert_good_rows_unchanged(engine, goods, results[1:])


def test_params_broken_after_construction_are_refused_before_the_row_joins(engine):
    nan_temperature = request("x", max_tokens=4)
    nan_temperature.params.temperature = math.nan
    text_top_p = engine.prepare(request("x", max_tokens=4))
    text_top_p.params.top_p = "0.5"  # e.g. a pipeline row rebuilt from loosely typed JSON
    goods = good_requests()
    results = engine.generate([nan_temperature, *goods, text_top_p])
    for bad, name in ((results[0], "temperature"), (results[-1], "top_p")):
        assert bad.finish_reason == "error" and bad.error_type == INVALID_REQUEST and name in bad.error
    assert_good_rows_unchanged(engine, goods, results[1:-1])


def test_errors_before_decoding_carry_their_type(engine):
    results = engine.generate(
        [request("too long", max_tokens=engine.max_context), request("bad", json_schema={"type": "x"})]
    )
    assert [r.finish_reason for r in results] == ["error", "error"]
    assert [r.error_type for r in results] == [INVALID_REQUEST, INVALID_REQUEST]
    assert "/project/cpp" not in results[1].error and "json_schema cannot be compiled" in results[1].error


def test_check_refuses_a_row_and_compiles_its_grammar_before_the_batch(engine, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from raybooth.models.constrained import GrammarError

    with pytest.raises(GrammarError, match="admits no value"):
        engine.check(request("x", json_schema={"$ref": "#"}))
    with pytest.raises(ValueError, match="temperature"):
        bad = request("x")
        bad.params.temperature = -1.0
        engine.check(bad)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.check(engine.prepare(request("x", max_tokens=engine.max_context)))
    schemas = [
        {"type": "object", "properties": {f"k{i}": {"type": "string", "maxLength": 40}}} for i in range(4)
    ]
    requests = [request("json", max_tokens=16, temperature=0.0, json_schema=s) for s in schemas]
    with ThreadPoolExecutor(4) as pool:  # callers compile ahead from their own threads
        list(pool.map(engine.check, requests))
    compiles = []
    real = engine.grammars.compiler

    class CountingCompiler:
        def compile_json_schema(self, *args, **kwargs):
            compiles.append(args[0])
            return real.compile_json_schema(*args, **kwargs)

    monkeypatch.setattr(engine.grammars, "compiler", CountingCompiler())
    results = engine.generate(requests)
    assert compiles == [] and all(r.error is None for r in results)  # the batch found every grammar compiled
