"""Benchmark: plain decoding vs speculative decoding in the generation engine, side by side in one run.

    .venv/bin/python benchmarks/speculative.py                    # CPU: a ~24M-weight served model
    .venv/bin/python benchmarks/speculative.py --device cuda      # GPU: a ~1.1B served model, bf16
    .venv/bin/python benchmarks/speculative.py --rows 4 --max-tokens 32 --num-tokens 3

Both models are built here from configs (random weights, seeded) with tiny-llm's ChatML tokenizer, saved
in the standard format and loaded through `VLMEngine.from_pretrained`, as a real checkpoint would be: a
served Llama and a draft about 10x smaller. One workload (greedy rows, different prompts, every row
running to its budget) runs on: plain decoding; speculative decoding with the small draft; and
speculative decoding with the served model as its own draft (every proposal accepted: the mechanism's
ceiling on acceptance, at a draft that costs as much as the model it drafts for). Printed per setup:
tokens/s, time to first token (prefill and first sample of the batch), acceptance rate, and the ratio of
each to plain. Random weights agree with nothing, so the small draft's acceptance is ~0 and it can only
lose; the last lines therefore put the measured pass costs into Leviathan et al.'s expected speedup
`(1 - a^(k+1)) / ((1 - a)(k c + v))` (c: one draft pass over one served pass, v: one (k+1)-token verify
pass over a one-token pass, a: acceptance rate) for the acceptance rates a trained draft of this size
reaches on real text (0.6-0.8 in the papers).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from raybooth.cluster.workdir import default_models_dir
from raybooth.models.decoding import SamplingParams
from raybooth.models.presets import resolve_model
from raybooth.models.speculative import SpeculativeOptions
from raybooth.models.speculative_sampling import AcceptanceCounters
from raybooth.models.vlm_engine import GenerationRequest, VLMEngine

# (served, draft) sizes: the draft has ~1/10 of the served model's weights.
SIZES = {
    "cpu": (
        dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8),
        dict(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4),
    ),
    "cuda": (
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32),
        dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12),
    ),
}
PROMPTS = ["Describe a dog on a beach.", "hi", "Write a poem about the sea " * 8, "What is 2 + 2?"]


def build(dest: Path, tokenizer: Any, seed: int, **size: int) -> str:
    heads = size["num_attention_heads"]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **size,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return str(dest)


def workload(rows: int, max_tokens: int, eos: set[int]) -> list[GenerationRequest]:
    bias = {t: -100.0 for t in eos}  # every row runs to its budget: the same token count on each side
    return [
        GenerationRequest(
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            params=SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=bias),
        )
        for i in range(rows)
    ]


def measure(engine: VLMEngine, requests: list[GenerationRequest]) -> dict[str, float]:
    """One run of the batch: tokens/s over the whole of it and the time to its first step."""
    sync(engine)
    began = time.perf_counter()
    tokens, first = 0, None
    for step in engine.generate_stream(requests):
        if first is None:
            first = time.perf_counter() - began
        tokens += sum(len(d.token_ids) for d in step if d is not None)
    sync(engine)
    took = time.perf_counter() - began
    return {"tokens_per_s": tokens / took, "ttft_s": first or took}


def sync(engine: VLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def pass_cost(engine: VLMEngine, rows: int, tokens: int, repeats: int = 10) -> float:
    """Seconds of one decode-shaped forward pass (`rows` x `tokens` new tokens over a short cache)."""
    ids = torch.randint(0, engine.vocab_size, (rows, 64 + tokens), device=engine.device)
    with torch.inference_mode():
        out = engine.model(ids[:, :64], use_cache=True)
        cache = out.past_key_values
        best = float("inf")
        for _ in range(repeats):
            sync(engine)
            began = time.perf_counter()
            engine.model(ids[:, 64:], past_key_values=cache, use_cache=True, logits_to_keep=tokens)
            sync(engine)
            best = min(best, time.perf_counter() - began)
            for layer in cache.layers:  # back to the 64-token prefix
                layer.keys, layer.values = layer.keys[:, :, :64], layer.values[:, :, :64]
    return best


def expected_speedup(acceptance: float, k: int, cost_ratio: float, verify_ratio: float) -> float:
    """Leviathan et al. 2023: expected tokens per step `(1 - a^(k+1)) / (1 - a)` over a step's cost in
    one-token served passes, `k c + v`; the paper takes v = 1 (a memory-bound GPU), here v is measured."""
    return (1 - acceptance ** (k + 1)) / ((1 - acceptance) * (k * cost_ratio + verify_ratio))


def run(
    device: str = "cpu", rows: int = 8, max_tokens: int = 48, num_tokens: int = 4, repeats: int = 3
) -> dict[str, dict[str, float]]:
    """Build both models, run the three setups on one workload, print the table; returns its numbers."""
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(1)  # one core per process: steadier figures on a shared machine
    dtype = torch.bfloat16 if device == "cuda" else None
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-llm", models_dir=default_models_dir()))
    served_size, draft_size = SIZES["cuda" if device == "cuda" else "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        served = build(Path(tmp) / "served", tokenizer, 0, **served_size)
        draft = build(Path(tmp) / "draft", tokenizer, 1, **draft_size)
        setups = {
            "plain": VLMEngine.from_pretrained(served, device=device, dtype=dtype),
            "speculative, draft 1/10": VLMEngine.from_pretrained(
                served, device=device, dtype=dtype, speculative=SpeculativeOptions(draft, num_tokens)
            ),
            "speculative, draft = served": VLMEngine.from_pretrained(
                served, device=device, dtype=dtype, speculative=SpeculativeOptions(served, num_tokens)
            ),
        }
        plain = setups["plain"]
        weights = {
            name: sum(p.numel() for p in model.parameters())
            for name, model in (("served", plain.model), ("draft", setups["speculative, draft 1/10"].speculative.draft.model))
        }  # fmt: skip
        requests = workload(rows, max_tokens, plain.eos_token_ids)
        for engine in setups.values():
            engine.generate(workload(rows, 4, plain.eos_token_ids))  # warm-up: kernels, allocator
            if engine.speculative is not None:
                engine.speculative.counters = AcceptanceCounters()  # the warm-up's left out
        # Rounds interleave the setups, so a neighbour's load on a shared machine hits each alike.
        results: dict[str, dict[str, float]] = {}
        for _ in range(repeats):
            for name, engine in setups.items():
                r = measure(engine, requests)
                best = results.setdefault(name, r)
                best["tokens_per_s"] = max(best["tokens_per_s"], r["tokens_per_s"])
                best["ttft_s"] = min(best["ttft_s"], r["ttft_s"])
        for name, engine in setups.items():
            results[name]["acceptance"] = (
                engine.speculative.counters.rate if engine.speculative else float("nan")
            )
        small = setups["speculative, draft 1/10"].speculative.draft
        cost_ratio = pass_cost(small, rows, 1) / pass_cost(plain, rows, 1)
        verify_ratio = pass_cost(plain, rows, num_tokens + 1) / pass_cost(plain, rows, 1)
    print(
        f"device {device}, {rows} greedy rows x {max_tokens} tokens, k = {num_tokens}; served "
        f"{weights['served'] / 1e6:.1f}M weights, draft {weights['draft'] / 1e6:.2f}M "
        f"({weights['served'] / weights['draft']:.1f}x smaller)"
    )
    print(f"{'setup':30s} {'tokens/s':>10s} {'x plain':>8s} {'TTFT ms':>9s} {'x plain':>8s} {'accepted':>9s}")
    base = results["plain"]
    for name, r in results.items():
        print(
            f"{name:30s} {r['tokens_per_s']:10.1f} {r['tokens_per_s'] / base['tokens_per_s']:8.2f} "
            f"{r['ttft_s'] * 1e3:9.1f} {r['ttft_s'] / base['ttft_s']:8.2f} {r['acceptance']:9.2f}"
        )
    print(
        f"measured here: one draft pass = {cost_ratio:.2f} served passes; one {num_tokens + 1}-token verify "
        f"pass = {verify_ratio:.2f} one-token passes"
    )
    for acceptance in (0.6, 0.8):
        speedup = expected_speedup(acceptance, num_tokens, cost_ratio, verify_ratio)
        print(
            f"expected speedup with this draft's cost at acceptance {acceptance}: {speedup:.2f}x "
            "(Leviathan et al. 2023, with the verify pass's measured cost)"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rows", type=int, default=8, help="rows decoded together")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per row")
    parser.add_argument("--num-tokens", type=int, default=4, help="k: tokens the draft proposes per step")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many rounds per setup")
    args = parser.parse_args()
    run(args.device, args.rows, args.max_tokens, args.num_tokens, args.repeats)


if __name__ == "__main__":
    main()
