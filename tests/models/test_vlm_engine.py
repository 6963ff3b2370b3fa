"""The VLM engine on tiny-vlm: batching does not change a row, sampling params, stops, JSON schemas, streaming.

.venv/bin/python -m pytest tests/models/test_vlm_engine.py
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from raybooth.models.decoding import SamplingParams, TextTracker
from raybooth.models.vlm_engine import GenerationRequest, VLMEngine
from raybooth.samples import draw_sample_image

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["cat", "dog", "car"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["label", "count", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_vlm_path) -> VLMEngine:
    return VLMEngine.from_pretrained(str(tiny_vlm_path), device="cpu")


def request(text: str, images: int = 0, first_image: int = 0, **params) -> GenerationRequest:
    parts = [{"type": "image", "image": draw_sample_image(first_image + i)} for i in range(images)]
    parts.append({"type": "text", "text": text})
    return GenerationRequest(messages=[{"role": "user", "content": parts}], params=SamplingParams(**params))


def mixed_requests() -> list[GenerationRequest]:
    """Prompt lengths from a few tokens to ~150, 0-2 images, greedy and seeded sampling, unequal budgets."""
    return [
        request("Describe the image.", images=1, max_tokens=10, temperature=0.0),
        request("hi", max_tokens=6, temperature=0.0),
        request(
            "a photo of a dog and a cat on the beach " * 12, images=2, max_tokens=12, temperature=0.9, seed=7
        ),
        request(
            "What color is the cat?",
            images=1,
            first_image=3,
            max_tokens=8,
            temperature=0.7,
            top_p=0.8,
            seed=1,
        ),
        request("yes", max_tokens=3, temperature=1.0, seed=123),
    ]


def test_row_output_does_not_depend_on_its_batch(engine):
    requests = mixed_requests()
    batched = engine.generate(requests)
    for req, in_batch in zip(requests, batched, strict=True):
        alone = engine.generate([req])[0]
        assert in_batch.token_ids == alone.token_ids
        assert in_batch.text == alone.text and in_batch.finish_reason == alone.finish_reason
    # A different neighbour set (reversed order, other batch size) still gives the same rows.
    reordered = engine.generate(requests[::-1][:3])
    assert [r.token_ids for r in reordered] == [r.token_ids for r in batched[::-1][:3]]


def test_counts_and_length_finish(engine):
    results = engine.generate(mixed_requests())
    for req, result in zip(mixed_requests(), results, strict=True):
        assert result.error is None
        assert result.prompt_tokens == engine.prepare(req).prompt_tokens
        assert 1 <= result.completion_tokens <= req.params.max_tokens
        assert result.finish_reason in ("stop", "length")
        if result.finish_reason == "length":
            assert result.completion_tokens == req.params.max_tokens
    # Each image becomes its 16 image tokens in the prompt (4x4 patches of a 32-pixel image).
    two_images = engine.prepare(request("x", images=2))
    assert two_images.input_ids.count(engine.model.config.image_token_id) == 32
    assert tuple(two_images.pixel_values.shape) == (2, 3, 32, 32)


def test_seed_reproduces_and_different_seeds_differ(engine):
    a = engine.generate([request("a cat", max_tokens=16, temperature=1.0, seed=5)])[0]
    b = engine.generate([request("a cat", max_tokens=16, temperature=1.0, seed=5)])[0]
    c = engine.generate([request("a cat", max_tokens=16, temperature=1.0, seed=6)])[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_string_cuts_the_text(engine):
    full = engine.generate([request("a dog", max_tokens=24, temperature=0.0)])[0]
    stop = full.text[6:8]
    assert len(stop) == 2
    cut = engine.generate([request("a dog", max_tokens=24, temperature=0.0, stop=[stop])])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text


def test_json_schema_output_validates(engine):
    requests = [
        request("Answer in JSON.", max_tokens=64, temperature=0.0, json_schema=SCHEMA),
        request("Answer in JSON.", images=1, max_tokens=64, temperature=1.0, seed=3, json_schema=SCHEMA),
        request("Any JSON object.", max_tokens=64, temperature=0.0, json_object=True),
    ]
    results = engine.generate(requests)
    for result in results[:2]:
        assert result.finish_reason == "stop", result
        jsonschema.validate(json.loads(result.text), SCHEMA)
    if results[2].finish_reason == "stop":  # free-form JSON may legitimately run out of tokens
        assert isinstance(json.loads(results[2].text), dict)
    else:
        assert results[2].text.startswith("{")


def test_row_errors_do_not_stop_the_batch(engine):
    results = engine.generate(
        [
            request("bad schema", max_tokens=8, json_schema={"type": "objectx"}),
            request("fine", max_tokens=4, temperature=0.0),
            request("too long", max_tokens=engine.max_context),
        ]
    )
    assert "json_schema cannot be compiled" in results[0].error and "objectx" in results[0].error
    assert results[1].error is None and results[1].completion_tokens >= 1
    assert "exceeds the model's context" in results[2].error


def test_stream_deltas_add_up_to_the_result(engine):
    requests = mixed_requests() + [request("bad", json_schema={"type": "nope"})]
    texts = [""] * len(requests)
    done_at: dict[int, int] = {}
    for step_no, step in enumerate(engine.generate_stream(requests)):
        assert len(step) == len(requests)
        for i, delta in enumerate(step):
            if i in done_at:
                assert delta is None  # nothing after a row's last delta
                continue
            if delta is not None:
                texts[i] += delta.text
                if delta.done:
                    done_at[i] = step_no
    assert set(done_at) == set(range(len(requests)))
    assert done_at[len(requests) - 1] == 0  # the failing row reports in the first step
    expected = engine.generate(requests)
    assert texts[:-1] == [r.text for r in expected[:-1]]


def test_a_cancelled_row_stops_decoding_and_leaves_the_batch(engine):
    requests = [
        request("a cat", max_tokens=40, temperature=0.0),
        request("a dog", max_tokens=40, temperature=0.0),
    ]
    alone = engine.generate([requests[1]])[0]
    assert alone.finish_reason == "length"  # the neighbour runs to its budget: the test sees the whole run
    batch_rows: list[int] = []
    real_forward = engine._forward

    def counting_forward(**inputs):
        batch_rows.append(int(inputs["input_ids"].shape[0]))
        return real_forward(**inputs)

    engine._forward = counting_forward
    cancelled: set[int] = set()
    finals: dict[int, object] = {}
    tokens = [0, 0]
    try:
        for step_no, step in enumerate(engine.generate_stream(requests, cancelled)):
            for i, delta in enumerate(step):
                if delta is not None:
                    tokens[i] += len(delta.token_ids)
                    if delta.done:
                        finals[i] = delta
            if step_no == 2:
                cancelled.add(0)  # e.g. the client went away after three tokens
    finally:
        engine._forward = real_forward
    assert finals[0].finish_reason == "cancelled" and finals[0].completion_tokens == 3 == tokens[0]
    assert finals[0].token_ids == []  # nothing sampled for it after the cancel
    # The neighbour is untouched, and decodes alone from the cancel on: prefill + 2 steps of 2 rows.
    assert finals[1].finish_reason == "length" and tokens[1] == 40
    assert batch_rows[:3] == [2, 2, 2] and set(batch_rows[3:]) == {1}
    assert engine.generate([requests[1]])[0].token_ids == alone.token_ids


def test_cancelling_every_row_ends_the_stream(engine):
    cancelled = {0, 1}
    steps = list(
        engine.generate_stream([request("a", max_tokens=30), request("b", max_tokens=30)], cancelled)
    )
    assert len(steps) == 1 and all(
        d.finish_reason == "cancelled" and d.completion_tokens == 0 for d in steps[0]
    )


class CharTokenizer:
    """Token i decodes to VOCAB[i]; enough to drive TextTracker without a model."""

    VOCAB = ["Hel", "lo", " wor", "ld", "!", "\n", "\n", "END", "\ufffd"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.VOCAB[i] for i in ids)


def test_text_tracker_holds_back_a_possible_stop_and_cuts_at_it():
    tracker = TextTracker(CharTokenizer(), stop=["\n\n", "world"])
    assert tracker.push(0) == ("Hel", False)
    assert tracker.push(1) == ("lo", False)
    # "wor" could begin "world": held back until the next token decides; the space is safe.
    assert tracker.push(2) == (" ", False)
    assert tracker.push(3) == ("", True)
    assert tracker.text == "Hello "


def test_text_tracker_releases_held_text_when_no_stop_follows():
    tracker = TextTracker(CharTokenizer(), stop=["\n\n"])
    assert tracker.push(4) == ("!", False)
    assert tracker.push(5) == ("", False)  # "\n" may start "\n\n"
    assert tracker.push(7) == ("\nEND", False)
    assert tracker.push(8) == ("", False)  # an incomplete UTF-8 character waits for its next byte
    assert tracker.flush() == "\ufffd"
