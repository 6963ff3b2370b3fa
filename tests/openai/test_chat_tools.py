"""Tool calls on tiny-vlm: a forced tool_choice constrains decoding to valid calls; tool turns reach the
chat template; requests that cannot be honoured are refused with the field named.

.venv/bin/python -m pytest tests/openai/test_chat_tools.py
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import ValidationError

from raybooth.models.vlm_engine import VLMEngine
from raybooth.openai.chat import (
    ChatLimits,
    ToolCallFormat,
    chat_completion_response,
    generation_request_from_chat,
)
from raybooth.openai.protocol import ChatCompletionRequest

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time"}},  # no parameters: an empty object
]
LIMITS = ChatLimits(max_tokens_cap=256)


@pytest.fixture(scope="module")
def engine(tiny_vlm_path) -> VLMEngine:
    return VLMEngine.from_pretrained(str(tiny_vlm_path), device="cpu")


def chat(**fields) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": TOOLS, "max_tokens": 96}
    return ChatCompletionRequest.model_validate({**body, **fields})


def answer(engine, req: ChatCompletionRequest):
    [result] = engine.generate([generation_request_from_chat(req, LIMITS)])
    return chat_completion_response(result, "tiny-vlm", tool_format=ToolCallFormat.of(req)).choices[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_named_function_gives_one_call_whose_arguments_validate(engine, seed):
    req = chat(
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=1.0, seed=seed
    )
    choice = answer(engine, req)
    assert choice.finish_reason == "stop"  # OpenAI's finish reason for a forced named function
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)  # strict JSON, valid arguments


@pytest.mark.parametrize("parallel", [None, False])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_required_gives_calls_of_the_offered_tools(engine, seed, parallel):
    req = chat(
        tool_choice="required", temperature=1.0, seed=seed, parallel_tool_calls=parallel, max_tokens=256
    )
    choice = answer(engine, req)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) >= 1
    if parallel is False:
        assert len(choice.message.tool_calls) == 1
    for call in choice.message.tool_calls:
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            jsonschema.validate(arguments, WEATHER)
        else:
            assert call.function.name == "get_time" and arguments == {}


def test_parallel_tool_calls_false_allows_one_call():
    fmt = ToolCallFormat.of(chat(tool_choice="required", parallel_tool_calls=False))
    assert fmt.schema["maxItems"] == 1 and fmt.schema["minItems"] == 1
    assert "maxItems" not in ToolCallFormat.of(chat(tool_choice="required")).schema


def test_a_call_cut_by_max_tokens_stays_text_with_length(engine):
    req = chat(tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=3)
    choice = answer(engine, req)
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith("{")


def test_tool_choice_none_answers_in_text_with_the_tools_in_the_prompt(engine):
    req = chat(tool_choice="none", temperature=0, max_tokens=4)
    gen = generation_request_from_chat(req, LIMITS)
    prompt = engine.tokenizer.decode(engine.prepare(gen).input_ids)
    assert '"name": "get_weather"' in prompt  # the model is shown the tools
    choice = answer(engine, req)
    assert choice.message.tool_calls is None and choice.message.content is not None


def test_tool_turns_reach_the_template(engine, tool_call_history):
    messages = [*tool_call_history, {"role": "user", "content": "And tomorrow?"}]
    req = chat(tool_choice="none", messages=messages)
    prompt = engine.tokenizer.decode(engine.prepare(generation_request_from_chat(req, LIMITS)).input_ids)
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}</tool_call>'
    assert call in prompt and "TOOL: sunny, 21C" in prompt
    assert prompt.index(call) < prompt.index("TOOL:") < prompt.index("And tomorrow?")


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({}, "tool_choice 'auto'"),  # tools with the default tool_choice
        ({"tool_choice": "auto"}, "tool_choice 'auto'"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "'nope', which is not in tools",
        ),
        ({"tools": None, "tool_choice": "required"}, "'required' needs tools"),
        ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "unique"),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format cannot be combined",
        ),
        (
            {"tool_choice": "none", "messages": [{"role": "tool", "content": "x"}]},
            "tool_call_id",
        ),
        ({"tool_choice": "none", "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
    ],
)
def test_tool_requests_that_cannot_be_honoured_are_refused(fields, fragment):
    with pytest.raises(ValidationError, match=fragment):
        chat(**fields)
