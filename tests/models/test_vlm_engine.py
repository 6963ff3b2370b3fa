"""The VLM engine on tiny-vlm: batching does not change a row, sampling params, stops, JSON schemas, streaming.

.venv/bin/python -m pytest tests/models/test_vlm_engine.py
"""

from __future__ import annotations

import json
from collections import Counter

import jsonschema
import pytest
import torch

from raybooth.models.decoding import SamplingParams, TextTracker, adjust_logits
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
    # Failed rows say so in finish_reason, and that the request is at fault (an HTTP caller's 400).
    assert [r.finish_reason for r in results] == ["error", results[1].finish_reason, "error"]
    assert [r.error_type for r in results] == ["invalid_request_error", None, "invalid_request_error"]


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
    real_forward = engine.forward

    def counting_forward(**inputs):
        batch_rows.append(int(inputs["input_ids"].shape[0]))
        return real_forward(**inputs)

    engine.forward = counting_forward
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
        engine.forward = real_forward
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


# -- logprobs, logit_bias, penalties ------------------------------------------------------------------


def test_logprobs_are_the_models_log_softmax_and_do_not_change_the_sample(engine):
    plain = engine.generate([request("a dog", max_tokens=12, temperature=0.0)])[0]
    scored = engine.generate([request("a dog", max_tokens=12, temperature=0.0, logprobs=3)])[0]
    assert plain.logprobs is None
    assert scored.token_ids == plain.token_ids and scored.text == plain.text
    entries = scored.logprobs
    eos = [t for t in scored.token_ids if t in engine.eos_token_ids]
    assert len(entries) == len(scored.token_ids) - len(eos)
    # The first token's logprob is log_softmax of the prompt's last logits, computed here without the engine.
    prepared = engine.prepare(request("a dog"))
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([prepared.input_ids])).logits[0, -1].float()
    expected = torch.log_softmax(logits, dim=-1)
    first = entries[0]
    assert first.logprob == pytest.approx(float(expected[scored.token_ids[0]]), abs=1e-4)
    best = torch.topk(expected, 3)
    assert [t.logprob for t in first.top] == pytest.approx([float(v) for v in best.values], abs=1e-4)
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top) == 3
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        # Greedy: the sampled token is the likeliest one.
        assert entry.top[0].token == entry.token and entry.top[0].logprob == pytest.approx(entry.logprob)
    # No stop string: the bytes of the tokens the text shows (special tokens are skipped) are its bytes.
    special = set(engine.tokenizer.all_special_ids)
    shown = b"".join(
        bytes(e.bytes)
        for e, t in zip(entries, scored.token_ids[: len(entries)], strict=True)
        if t not in special
    )
    assert shown.decode("utf-8", errors="replace") == scored.text


def test_logprobs_of_a_row_do_not_depend_on_its_batch(engine):
    requests = [request("a dog", max_tokens=8, temperature=0.8, seed=3, logprobs=2)] + mixed_requests()[:3]
    alone = engine.generate(requests[:1])[0]
    batched = engine.generate(requests)[0]
    assert batched.token_ids == alone.token_ids
    # Same tokens; the numbers agree to float32 rounding (batched matmuls may sum in another order).
    assert [e.token for e in batched.logprobs] == [e.token for e in alone.logprobs]
    assert [e.logprob for e in batched.logprobs] == pytest.approx(
        [e.logprob for e in alone.logprobs], abs=1e-4
    )


def test_logit_bias_forces_and_bans_tokens(engine):
    plain = engine.generate([request("a dog", max_tokens=6, temperature=0.0)])[0]
    forced_id = 100
    forced = engine.generate([request("a dog", max_tokens=6, temperature=0.0, logit_bias={forced_id: 100})])[
        0
    ]
    assert forced.token_ids == [forced_id] * 6
    banned = plain.token_ids[0]
    other = engine.generate([request("a dog", max_tokens=6, temperature=0.0, logit_bias={banned: -100})])[0]
    assert banned not in other.token_ids
    # A token id outside the vocabulary is that row's error, named.
    bad = engine.generate([request("a dog", max_tokens=2, logit_bias={engine.vocab_size + 5: 1.0})])[0]
    assert bad.error is not None and "logit_bias" in bad.error and str(engine.vocab_size + 5) in bad.error


def test_penalties_lower_the_logits_of_generated_tokens():
    logits = torch.zeros(6)
    logits[5] = float("-inf")  # a grammar-masked token stays masked
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0, logit_bias={0: 3.0, 5: 100.0})
    out = adjust_logits(logits, params, Counter({1: 2, 2: 1}))
    assert out.tolist() == [3.0, -2.0, -1.5, 0.0, 0.0, float("-inf")]
    assert logits.tolist()[:5] == [0.0] * 5  # the input is left alone
    assert adjust_logits(logits, SamplingParams(), Counter({1: 3})) is logits  # nothing to apply: no copy


def test_penalties_break_greedy_repetition(engine):
    plain = engine.generate([request("a dog", max_tokens=24, temperature=0.0)])[0]
    repeats = len(plain.token_ids) - len(set(plain.token_ids))
    assert repeats > 0  # tiny-vlm loops under greedy decoding: what the penalties are for
    penalized = engine.generate(
        [request("a dog", max_tokens=24, temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)]
    )[0]
    assert len(penalized.token_ids) - len(set(penalized.token_ids)) < repeats


@pytest.mark.parametrize(
    "field, value",
    [("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("logit_bias", {1: 101.0}), ("logprobs", 21)],
)
def test_sampling_params_refuse_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=field if field != "logprobs" else "top_logprobs"):
        SamplingParams(**{field: value})


def test_length_bounded_strings_hold_no_raw_control_characters(engine):
    # xgrammar's own rule for a string with maxLength admits U+0000-U+001F, which strict JSON parsers
    # reject; the engine compiles such strings as an equivalent pattern without them.
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 24}},
        "required": ["city"],
        "additionalProperties": False,
    }
    requests = [
        request("Answer in JSON.", max_tokens=48, temperature=1.0, seed=seed, json_schema=schema)
        for seed in range(12)
    ]
    finished = [r for r in engine.generate(requests) if r.finish_reason == "stop"]
    assert len(finished) >= 6
    for result in finished:
        city = json.loads(result.text)["city"]  # strict parsing: a raw control character would fail here
        assert not any(ord(ch) < 0x20 for ch in city)
        # maxLength counts characters as xgrammar reads UTF-8: it takes an overlong form (E0 86 80, which a
        # random tiny model can emit) as one character, where Python decodes one U+FFFD per byte.
        assert 1 <= len(city) - 2 * city.count("\ufffd\ufffd\ufffd") <= 24, city
