"""Schema refusals before compiling, user-facing compile errors, and sampling that cannot hit multinomial errors.

.venv/bin/python -m pytest tests/models/test_constrained.py
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from transformers import AutoTokenizer

from raybooth.models.constrained import GrammarError, JSONGrammars, check_schema, user_reason
from raybooth.models.decoding import NoTokenError, SamplingError, SamplingParams, sample_token
from raybooth.models.schema_checks import (
    MAX_OPTIONAL_PROPERTIES,
    MAX_SCHEMA_DEPTH,
    MAX_STRING_BOUND,
    MAX_TOTAL_STRING_BOUND,
)


@pytest.fixture(scope="module")
def grammars(tiny_vlm_path) -> JSONGrammars:
    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm_path)
    return JSONGrammars(tokenizer, vocab_size=len(tokenizer))


def nested_arrays(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


EMPTY = {
    "ref-root": {"$ref": "#"},
    "mutual-defs": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "required-self": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    "enum-empty": {"enum": []},
    "not-anything": {"not": {}},
    "false-item": {"type": "array", "items": False, "minItems": 1},
    "anyof-all-empty": {"anyOf": [{"enum": []}, {"not": True}]},
    "false": False,
}


@pytest.mark.parametrize("schema", EMPTY.values(), ids=EMPTY.keys())
def test_a_schema_that_admits_no_value_is_refused_at_compile(grammars, schema):
    with pytest.raises(GrammarError, match="^response_format json_schema admits no value: ") as info:
        grammars.matcher(SamplingParams(json_schema=schema))
    assert ".cc" not in str(info.value) and "Check failed" not in str(info.value)


def test_recursive_schemas_with_a_base_case_still_compile(grammars):
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["name", "kids"],
            }
        },
        "$ref": "#/$defs/node",
    }
    optional_self = {"type": "object", "properties": {"next": {"$ref": "#"}}}  # {} ends it
    either = {"anyOf": [{"$ref": "#"}, {"type": "null"}]}
    for schema in (tree, optional_self, either):
        check_schema(schema)
        assert grammars.matcher(SamplingParams(json_schema=schema)) is not None


# Time bounds below are CPU time of this process (process_time), so other work on the box does not count.


def test_a_190_deep_schema_is_refused_fast_without_recursion_error(grammars):
    start = time.process_time()
    with pytest.raises(GrammarError, match=f"nests deeper than {MAX_SCHEMA_DEPTH} levels"):
        grammars.matcher(SamplingParams(json_schema=nested_arrays(190)))
    # Deep enough to break Python's recursion in a recursive walk; the check walks with a stack.
    with pytest.raises(GrammarError, match="nests deeper"):
        grammars.matcher(SamplingParams(json_schema=nested_arrays(5000)))
    assert time.process_time() - start < 1.0
    check_schema(nested_arrays(MAX_SCHEMA_DEPTH - 1))


def test_long_string_bounds_are_refused_fast_and_allowed_ones_compile_within_a_bound(grammars):
    # minLength 5000 took ~12 s to compile (the equivalent pattern's automaton grows with the bound).
    start = time.process_time()
    with pytest.raises(
        GrammarError, match=f"minLength/maxLength may be at most {MAX_STRING_BOUND}, got 5000"
    ):
        grammars.matcher(SamplingParams(json_schema={"type": "string", "minLength": 5000}))
    assert time.process_time() - start < 0.5
    many = {f"p{i}": {"type": "string", "maxLength": 600} for i in range(4)}
    with pytest.raises(GrammarError, match=f"add up to more than {MAX_TOTAL_STRING_BOUND}"):
        check_schema({"type": "object", "properties": many})
    # The largest allowed bound: ~0.4 s on the 2-core CI box; 5 s leaves room for a busy machine.
    start = time.process_time()
    grammars.matcher(SamplingParams(json_schema={"type": "string", "maxLength": MAX_STRING_BOUND}))
    assert time.process_time() - start < 5.0


def test_objects_with_too_many_optional_properties_are_refused_fast(grammars):
    # 990 optional integer properties took ~10 s to compile; the same ones all required take ~0.05 s.
    names = [f"p{i}" for i in range(990)]
    properties = {name: {"type": "integer"} for name in names}
    start = time.process_time()
    with pytest.raises(GrammarError, match=f"990 optional properties, more than {MAX_OPTIONAL_PROPERTIES}"):
        grammars.matcher(SamplingParams(json_schema={"type": "object", "properties": properties}))
    assert time.process_time() - start < 0.5
    required = {"type": "object", "properties": properties, "required": names}
    assert grammars.matcher(SamplingParams(json_schema=required)) is not None


def test_a_pattern_grammar_compiles_after_an_any_json_one(grammars):
    # With xgrammar's own cache on, this second compile failed a C++ check after any json_object request.
    grammars.matcher(SamplingParams(json_object=True))
    grammars.matcher(SamplingParams(json_schema={"not": {"type": "string"}}))
    assert grammars.matcher(SamplingParams(json_schema={"type": "string", "minLength": 300})) is not None


def test_compile_errors_show_no_cpp_text(grammars):
    with pytest.raises(GrammarError) as info:
        grammars.matcher(SamplingParams(json_schema={"type": "string", "minLength": 5, "maxLength": 2}))
    assert str(info.value) == "response_format json_schema minLength 5 is greater than maxLength 2"
    with pytest.raises(GrammarError) as info:  # xgrammar's own message, its C++ location cut off
        grammars.matcher(SamplingParams(json_schema={"type": "array", "minItems": 3, "maxItems": 1}))
    assert str(info.value) == (
        "response_format json_schema cannot be compiled: minItems is greater than maxItems: 3 > 1"
    )
    internal = RuntimeError(
        "[09:31:40] /project/cpp/grammar_functor.cc:3567: Check failed: (a->b) is false: "
    )
    assert user_reason(internal) == "the grammar compiler could not build it; simplify the schema"


# -- sampling never raises out of torch.multinomial ------------------------------------------------------


def test_underflowing_temperature_and_top_p_pick_the_likeliest_token():
    logits = torch.tensor([1.0, 30.0, -5.0, 29.5])
    gen = torch.Generator().manual_seed(0)
    for params in (
        SamplingParams(temperature=1e-300),
        SamplingParams(temperature=1e-30),
        SamplingParams(temperature=1.0, top_p=1e-300),
        SamplingParams(temperature=2.0, top_p=1e-45),
    ):
        assert sample_token(logits, params, gen) == 1
    # Just above the greedy cut-off, huge logits still give a finite distribution (max subtracted first).
    assert sample_token(torch.tensor([1e30, -1e30, 0.0]), SamplingParams(temperature=1e-4), gen) == 0


def test_a_row_with_no_token_or_broken_logits_raises_its_own_error():
    gen = torch.Generator().manual_seed(0)
    masked = torch.full((5,), -math.inf)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.5)):
        with pytest.raises(NoTokenError, match="admits no further output"):
            sample_token(masked, params, gen)
        with pytest.raises(SamplingError, match="non-finite"):
            sample_token(torch.tensor([0.0, math.nan, 1.0]), params, gen)
    assert issubclass(NoTokenError, ValueError) and not issubclass(SamplingError, ValueError)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", math.nan),
        ("temperature", "0.5"),
        ("top_p", math.inf),
        ("max_tokens", True),
        ("presence_penalty", math.nan),
        ("logit_bias", {1: math.nan}),
        ("stop", "END"),
        ("seed", 1.5),
    ],
)
def test_sampling_params_refuse_non_numbers_with_the_field_named(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
