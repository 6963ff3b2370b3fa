"""Speculative decoding (`models/speculative.py`): same greedy tokens, the served model's distribution, grammars.

.venv/bin/python -m pytest tests/models/test_speculative.py

The served model is tiny-llm; the draft is a Llama ~10x smaller built here with tiny-llm's tokenizer
(saved and loaded through the engine's own loader), or tiny-llm itself (every proposal then survives).
The distribution test builds a 16-token vocabulary pair of models with sharp, different distributions.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from raybooth.cluster.workdir import default_models_dir
from raybooth.errors import ModelError
from raybooth.models.decoding import SamplingParams
from raybooth.models.presets import resolve_model
from raybooth.models.speculative import SpeculativeOptions
from raybooth.models.vlm_engine import GenerationRequest, PreparedRequest, StreamDelta, VLMEngine
from raybooth.models.vlm_scheduler import Scheduler

SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["cat", "dog", "car"]}, "count": {"type": "integer"}},
    "required": ["label", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def served_path() -> str:
    return resolve_model("tiny-llm", kind="vlm", models_dir=default_models_dir())


@pytest.fixture(scope="module")
def plain(served_path) -> VLMEngine:
    return VLMEngine.from_pretrained(served_path, device="cpu")


def save_llama(dest: Path, tokenizer, seed: int, head_scale: float = 1.0, **config) -> str:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config, pad_token_id=tokenizer.pad_token_id, bos_token_id=None))
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)  # sharper distributions: the statistical test's power
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return str(dest)


@pytest.fixture(scope="module")
def draft_path(served_path, tmp_path_factory) -> str:
    """A 1-layer, 12-wide Llama on tiny-llm's tokenizer: ~12k weights against tiny-llm's ~130k."""
    tokenizer = AutoTokenizer.from_pretrained(served_path)
    return save_llama(
        tmp_path_factory.mktemp("draft"),
        tokenizer,
        seed=1,
        vocab_size=len(tokenizer),
        hidden_size=12,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def noisy_draft_path(served_path, tmp_path_factory) -> str:
    """tiny-llm with noise on its output layer: it agrees with the served model's argmax about 2 times in
    3, so a batch's rows keep different numbers of proposals (the case the masked cache slots serve)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(served_path)
    torch.manual_seed(0)
    with torch.no_grad():
        weight = model.lm_head.weight
        weight.add_(0.3 * weight.std() * torch.randn_like(weight))
    dest = tmp_path_factory.mktemp("noisy_draft")
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(served_path).save_pretrained(dest)
    return str(dest)


def speculative(served_path: str, draft: str, k: int) -> VLMEngine:
    return VLMEngine.from_pretrained(
        served_path, device="cpu", models_dir=default_models_dir(), speculative=SpeculativeOptions(draft, k)
    )


def request(text: str, **params) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], params=SamplingParams(**params))


def mixed_greedy() -> list[GenerationRequest]:
    """Different prompts, lengths, budgets, a stop string, logit_bias and penalties; all greedy."""
    return [
        request("hi", max_tokens=24, temperature=0.0),
        request("a long prompt about a dog on a beach " * 6, max_tokens=9, temperature=0.0),
        request("stop here", max_tokens=30, temperature=0.0, stop=["it"]),
        request("x", max_tokens=17, temperature=0.0, frequency_penalty=1.5, logit_bias={5: 3.0}),
        request("one", max_tokens=1, temperature=0.0),
    ]


@pytest.mark.parametrize(("draft", "k"), [("small", 3), ("noisy", 1), ("noisy", 4)])
def test_greedy_rows_equal_plain_decoding(plain, served_path, draft_path, noisy_draft_path, draft, k):
    engine = speculative(served_path, {"small": draft_path, "noisy": noisy_draft_path}[draft], k)
    expected = plain.generate(mixed_greedy())
    got = engine.generate(mixed_greedy())
    for e, g in zip(expected, got, strict=True):
        assert (g.token_ids, g.text, g.finish_reason) == (e.token_ids, e.text, e.finish_reason)
        assert g.completion_tokens == e.completion_tokens and g.error is None
    assert any(e.finish_reason == "stop" for e in expected)  # the stop string cut a row
    counters = engine.speculative.counters
    assert counters.accepted < counters.proposed  # proposals were rejected: the replacement path ran
    if draft == "noisy":  # ... and kept: rows advanced by different counts in one batch
        assert counters.accepted > counters.proposed / 4


def test_draft_equal_to_served_keeps_every_proposal_and_streams_several_tokens(plain, served_path):
    engine = speculative(served_path, served_path, 4)
    requests = [
        request("hi", max_tokens=21, temperature=0.0),
        request("sampled", max_tokens=13, temperature=0.9, top_p=0.9, seed=5),
    ]
    steps = list(engine.generate_stream(requests))
    counters = engine.speculative.counters
    assert counters.proposed > 0 and counters.accepted == counters.proposed
    tokens = [[t for step in steps if step[i] is not None for t in step[i].token_ids] for i in range(2)]
    assert [len(t) for t in tokens] == [21, 13]
    assert tokens[0] == plain.generate(requests[:1])[0].token_ids
    # After the prefill's token, each step gives k + 1 = 5 tokens per row until its budget ends it.
    assert [len(s[0].token_ids) for s in steps if s[0] is not None] == [1, 5, 5, 5, 5]
    assert counters.verify_passes == 4


def tiny_vocab_tokenizer(dest: Path) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(16)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0")


def reference_marginals(model: LlamaForCausalLM, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """Exact distributions `(3, 16)` of tokens 2, 3 and 4, from the served model alone: every prefix of
    tokens 1-3 in one batch, each position's temperature softmax cut to its top_p nucleus."""

    def processed(logits: torch.Tensor) -> torch.Tensor:  # (..., 16) -> what plain sampling draws from
        probs = torch.softmax(logits / params.temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < params.top_p
        kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
        return kept / kept.sum(dim=-1, keepdim=True)

    prefixes = torch.cartesian_prod(*[torch.arange(16)] * 3)  # (4096, 3): tokens 1, 2, 3
    ids = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        p1 = processed(model(torch.tensor([prompt])).logits[0, -1])  # (16,)
        later = processed(model(ids).logits[:, -3:])  # (4096, 3, 16): P(t2|t1), P(t3|t1 t2), P(t4|t1 t2 t3)
    t1, t2, t3 = prefixes.unbind(1)
    weight1 = p1[t1]  # P(t1)
    weight2 = weight1 * later[torch.arange(len(prefixes)), 0, t2]  # P(t1 t2)
    weight3 = weight2 * later[torch.arange(len(prefixes)), 1, t3]  # P(t1 t2 t3)
    # Each prefix of length j appears 16^(3 - j) times in the table: divide that out.
    m2 = (weight1[:, None] * later[:, 0]).sum(0) / 256
    m3 = (weight2[:, None] * later[:, 1]).sum(0) / 16
    m4 = (weight3[:, None] * later[:, 2]).sum(0)
    return torch.stack([m2, m3, m4])


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, cells expected below 5 pooled into one."""
    expected = expected_probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    used = expected > 0
    return float(((observed[used] - expected[used]) ** 2 / expected[used]).sum()), int(used.sum()) - 1


# Pearson's chi-square critical values at p = 0.001 by degrees of freedom (fixed seeds: deterministic).
ROWS = 2000
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88,
            10: 29.59, 11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70}  # fmt: skip


def test_sampled_tokens_keep_the_served_models_distribution(tmp_path):
    """2000 seeded rows of 4 tokens on a 16-token vocabulary; tokens 2-4 come from speculative steps
    (k = 2, a draft whose distributions differ from the served model's). Each position's histogram
    passes Pearson's chi-square test against the exact distribution at p = 0.001, and the draft alone
    would fail it by far (its statistic is over 5x the bound)."""
    tokenizer = tiny_vocab_tokenizer(tmp_path)
    config = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    served = save_llama(tmp_path / "served", tokenizer, seed=0, head_scale=40.0, **config)
    draft = save_llama(tmp_path / "draft", tokenizer, seed=1, head_scale=40.0, **config)
    engine = speculative(served, draft, 2)
    params = dict(max_tokens=4, temperature=0.8, top_p=0.95)
    prompt = [3, 7, 1]
    rows = [PreparedRequest(prompt, SamplingParams(**params, seed=s)) for s in range(ROWS)]
    results = engine.generate(rows)
    tokens = torch.tensor([r.token_ids for r in results])  # (N, 4)
    exact = reference_marginals(engine.model, prompt, SamplingParams(**params))
    draft_exact = reference_marginals(engine.speculative.draft.model, prompt, SamplingParams(**params))
    for position in range(3):
        counts = torch.bincount(tokens[:, position + 1], minlength=16).float()
        stat, dof = chi_square(counts, exact[position])
        draft_stat, draft_dof = chi_square(counts, draft_exact[position])
        assert stat < CHI2_999[dof], (position, stat, dof)
        assert draft_stat > 5 * CHI2_999[draft_dof], (position, draft_stat)
    counters = engine.speculative.counters
    assert min(counters.accepted, counters.proposed - counters.accepted) > 200  # both paths, many times


def test_json_rows_stay_valid_and_greedy_ones_equal_plain(plain, served_path, noisy_draft_path):
    engine = speculative(served_path, noisy_draft_path, 3)
    requests = [
        request("JSON please", max_tokens=48, temperature=0.0, json_schema=SCHEMA),
        request("JSON please", max_tokens=48, temperature=1.0, seed=2, json_schema=SCHEMA),
        request("free text", max_tokens=12, temperature=0.0),
        request("an object", max_tokens=48, temperature=0.0, json_object=True),
    ]
    got = engine.generate(requests)
    for result in got[:2]:
        assert result.finish_reason == "stop", result
        jsonschema.validate(json.loads(result.text), SCHEMA)
    if got[3].finish_reason == "stop":
        assert isinstance(json.loads(got[3].text), dict)
    expected = plain.generate([requests[i] for i in (0, 2, 3)])
    assert [got[i].token_ids for i in (0, 2, 3)] == [e.token_ids for e in expected]
    assert engine.speculative.counters.accepted < engine.speculative.counters.proposed


def test_cancel_frees_the_row(plain, noisy_draft_path):
    # Built through the constructor this time: the served model's weights shared with `plain`.
    engine = VLMEngine(
        plain.model, plain.processor, speculative=(VLMEngine.from_pretrained(noisy_draft_path), 2)
    )
    batch_sizes: list[int] = []
    step = engine.speculative.step

    def recording(rows, *args):
        batch_sizes.append(len(rows))
        return step(rows, *args)

    engine.speculative.step = recording
    requests = [
        request("stay", max_tokens=16, temperature=0.0),
        request("leave", max_tokens=16, temperature=0.0),
    ]
    cancelled: set[int] = set()
    stream = engine.generate_stream(requests, cancelled)
    first = next(stream)
    assert first[1] is not None and not first[1].done
    cancelled.add(1)
    rest = list(stream)
    assert rest[0][1].finish_reason == "cancelled"
    assert all(step[1] is None for step in rest[1:])
    assert batch_sizes and set(batch_sizes) == {1}  # every speculative step ran without the cancelled row
    stayed = first[0].token_ids + [t for s in rest if s[0] is not None for t in s[0].token_ids]
    assert stayed == plain.generate(requests[:1])[0].token_ids


def test_draft_with_another_tokenizer_is_refused(served_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(served_path)
    tokenizer.add_tokens(["<not-in-the-served-vocabulary>"])
    other = save_llama(
        tmp_path, tokenizer, seed=0, vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    with pytest.raises(
        ModelError, match=r"^draft model .* does not share the tokenizer of the served model "
    ):
        speculative(served_path, other, 2)


def test_refused_where_it_cannot_run(plain, served_path):
    qwen = resolve_model("tiny-qwen2.5-vl", kind="vlm", models_dir=default_models_dir())
    with pytest.raises(ModelError, match=r"cannot use the served model .*: its positions are 3-D \(M-RoPE\)"):
        speculative(qwen, served_path, 2)
    with pytest.raises(ValueError, match=r"num_tokens must be an integer in \[1, 16\], got 0"):
        SpeculativeOptions(served_path, 0)


def test_scheduler_admits_rows_mid_flight_between_speculative_steps(plain, served_path, noisy_draft_path):
    """Continuous batching with a draft: rows join a running batch (both caches merged) and leave it, and
    each row still gives its own tokens (greedy: plain decoding's; sampled: its seeded output alone)."""
    engine = speculative(served_path, noisy_draft_path, 3)
    requests = [
        request("a long prompt about a dog on a beach " * 5, max_tokens=24, temperature=0.0),
        request("hi", max_tokens=14, temperature=0.0),
        request("sampled", max_tokens=12, temperature=0.9, seed=3),
    ]
    expected = [r.token_ids for r in plain.generate(requests[:2])]
    expected += [engine.generate([requests[2]])[0].token_ids]
    rows: list[list[StreamDelta]] = [[] for _ in requests]
    finished = [threading.Event() for _ in requests]

    def collect(i: int):
        def on_delta(delta: StreamDelta) -> None:
            rows[i].append(delta)
            if delta.done:
                finished[i].set()

        return on_delta

    sched = Scheduler(engine, max_rows=4, max_queue=4)
    try:
        for i, req in enumerate(requests):
            deadline = time.monotonic() + 60
            while sched.steps < 2 * i:  # row 1 joins at step 2, row 2 at step 4, while row 0 decodes
                assert time.monotonic() < deadline
                time.sleep(0.0005)
            sched.submit(engine.prepare(req), collect(i))
        assert all(event.wait(60) for event in finished)
        stats = sched.stats()
    finally:
        sched.close()
    assert [[t for d in row for t in d.token_ids] for row in rows] == expected
    assert len(stats["admissions"]) == 3 and stats["merges_mid_flight"]
    assert any(len(d.token_ids) > 1 for row in rows for d in row)  # speculative steps ran in the loop
