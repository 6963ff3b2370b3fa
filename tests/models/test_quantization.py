"""`quantization: int8` in the generation engine: weight memory, closeness to fp32, refusals, config keys.

.venv/bin/python -m pytest tests/models/test_quantization.py

Each preset is loaded twice per module (fp32 and int8), from the session's built presets. The claims, on
the tiny presets' random weights (logits within ~0.5 of each other, so the closest two candidates are
often a few hundredths apart, harder for int8 than a trained model's peaked distributions):
- the quantised linear weights (int8 data + per-channel fp32 scales + zero points) take <= 0.3x their fp32
  bytes (measured ~0.27; the whole model, embeddings and `lm_head` kept in fp32, ~0.55-0.6x);
- last-position logits differ from fp32 by at most 3% of fp32's largest logit (measured <= 1.5%);
- teacher-forced along fp32's greedy continuation, int8's greedy pick agrees at >= 90% of positions
  (measured ~98%); exact whole sequences agree less (~6 of 8): one near-tie sends a sequence elsewhere.
"""

from __future__ import annotations

import logging

import pytest
import torch

from raybooth.cluster.config import BatchConfig, CaptionConfig, ServeConfig, load_config
from raybooth.errors import ConfigError
from raybooth.models.decoding import SamplingParams
from raybooth.models.quantization import (
    QuantizationError,
    check_quantization,
    is_quantized,
    quiet_torchao_import_noise,
    weight_bytes,
)
from raybooth.models.vlm_engine import GenerationRequest, VLMEngine
from raybooth.samples import draw_sample_image

PROMPTS = [
    "Describe the image.",
    "What color is it?",
    "hi",
    "Count the objects.",
    "a photo of a dog on the beach",
    "Is it day or night?",
    "Name one thing you see.",
    "Write a short caption.",
]
MAX_TOKENS = 8
LOGIT_TOLERANCE = 0.03  # of fp32's largest |logit| at that position
GREEDY_AGREEMENT = 0.90  # teacher-forced positions whose greedy token agrees


@pytest.fixture(scope="module", params=["tiny-llm", "tiny-vlm"])
def engines(request) -> tuple[VLMEngine, VLMEngine]:
    """(fp32, int8) engines of one preset: the text-only LLM and the LLaVA-shaped VLM."""
    from raybooth.cluster.workdir import default_models_dir

    models = default_models_dir()
    fp32 = VLMEngine.from_pretrained(request.param, device="cpu", models_dir=models)
    int8 = VLMEngine.from_pretrained(request.param, device="cpu", models_dir=models, quantization="int8")
    return fp32, int8


def prompt_requests(engine: VLMEngine) -> list[GenerationRequest]:
    def parts(i: int, text: str) -> list[dict]:
        image = [{"type": "image", "image": draw_sample_image(i)}] if engine.family.takes_images else []
        return [*image, {"type": "text", "text": text}]

    return [
        GenerationRequest(
            messages=[{"role": "user", "content": parts(i, text)}],
            params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        )
        for i, text in enumerate(PROMPTS)
    ]


def special_token_ids(config) -> set[int]:
    """Ids a continuation must not feed back (an image placeholder would ask for image features)."""
    return {
        v for k, v in vars(config).items() if k.endswith(("token_id", "token_index")) and isinstance(v, int)
    }


def test_int8_linear_weights_take_at_most_0_3x_their_fp32_bytes(engines):
    fp32, int8 = engines
    full, quantized = weight_bytes(fp32.model), weight_bytes(int8.model)
    assert full.quantized_linears == 0 and full.linear == full.linear_fp32  # off means off
    assert quantized.quantized_linears >= 14  # every attention and MLP projection (tiny-llm has 14)
    assert quantized.linear_fp32 == full.linear  # the same weights counted on both sides
    assert quantized.linear <= 0.3 * full.linear, quantized
    assert quantized.total < 0.7 * full.total  # embeddings and lm_head stay fp32: the whole model is ~0.6x
    assert not is_quantized(int8.model.get_output_embeddings().weight)


def test_int8_last_position_logits_stay_within_3_percent_of_fp32(engines):
    fp32, int8 = engines
    worst = 0.0
    for request in prompt_requests(fp32):
        prepared = fp32.prepare(request)
        ids = torch.tensor([prepared.input_ids])
        with torch.no_grad():
            expected = fp32.model(input_ids=ids, **prepared.inputs).logits[0, -1]
            got = int8.model(input_ids=ids, **prepared.inputs).logits[0, -1]
        assert not torch.equal(got, expected)  # the int8 weights are really used
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
    assert worst <= LOGIT_TOLERANCE, worst


def test_int8_greedy_tokens_agree_with_fp32_teacher_forced(engines):
    """fp32's greedy continuation of each prompt (through the engine) fed back to both models: at each
    position int8's argmax is compared with fp32's (which reproduces the engine's own tokens)."""
    fp32, int8 = engines
    requests = prompt_requests(fp32)
    special = special_token_ids(fp32.model.config)
    agree = total = 0
    for request, result in zip(requests, fp32.generate(requests), strict=True):
        prepared = fp32.prepare(request)
        fed = result.token_ids[:-1]
        fed = fed[: next((j for j, t in enumerate(fed) if t in special), len(fed))]
        ids = torch.tensor([prepared.input_ids + fed])
        with torch.no_grad():
            expected = fp32.model(input_ids=ids, **prepared.inputs).logits[0, -len(fed) - 1 :].argmax(-1)
            got = int8.model(input_ids=ids, **prepared.inputs).logits[0, -len(fed) - 1 :].argmax(-1)
        assert expected.tolist() == result.token_ids[: len(fed) + 1]
        agree += int((got == expected).sum())
        total += len(fed) + 1
    assert total >= len(PROMPTS) * 2
    assert agree / total >= GREEDY_AGREEMENT, f"{agree}/{total}"


def test_int8_engine_generates_rows_of_a_batch_like_alone(engines):
    """The quantised model runs through the engine's batched decode loop: a row batched with the others
    gets the tokens it gets alone."""
    _, int8 = engines
    requests = prompt_requests(int8)[:3]
    batched = int8.generate(requests)
    alone = [int8.generate([r])[0] for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert all(r.error is None and r.completion_tokens >= 1 for r in batched)


def test_an_unknown_quantization_or_a_device_without_kernels_is_refused_in_one_line():
    with pytest.raises(QuantizationError, match=r"unknown quantization 'int4'.*one of: null, int8"):
        check_quantization("int4", torch.device("cpu"))
    with pytest.raises(QuantizationError, match=r"not available on mps.*set quantization: null"):
        check_quantization("int8", torch.device("mps"))
    check_quantization(None, torch.device("mps"))  # off is available everywhere
    check_quantization("int8", torch.device("cpu"))


def test_quantization_is_a_top_level_job_key_and_a_chat_key():
    assert load_config(CaptionConfig, None, ["quantization=int8"]).quantization == "int8"
    assert load_config(BatchConfig, None, ["quantization=int8"]).quantization == "int8"
    assert load_config(BatchConfig, None, ["quantization=null"]).quantization is None
    assert load_config(ServeConfig, None, ["chat.quantization=int8"]).chat.quantization == "int8"
    with pytest.raises(ConfigError, match=r"key quantization: Input should be 'int8' \(got 'int4'\)"):
        load_config(CaptionConfig, None, ["quantization=int4"])
    with pytest.raises(ConfigError, match=r"key chat.quantization: Input should be 'int8'"):
        load_config(ServeConfig, None, ["chat.quantization=fp8"])


def test_torchao_import_noise_is_filtered_and_other_records_pass():
    quiet_torchao_import_noise()

    def passes(name: str, msg: str, *args) -> bool:
        record = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)
        return logging.getLogger(name).filter(record)

    from torchao.quantization.quantize_.common import KernelPreference

    so = "/venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so"
    assert not passes("torchao", "Failed to load %s: Could not load this library", so)
    enum_note = "%s is an Enum subclass and is now natively supported by torch.compile"
    assert not passes("torch.utils._pytree", enum_note, KernelPreference)
    assert not passes(
        "diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects. ..."
    )
    assert passes("torchao", "something else went wrong")
    assert passes("torch.utils._pytree", enum_note, logging.Formatter)  # not torchao's: kept


def test_the_batch_jobs_replica_loads_the_configs_quantization():
    """`quantization=int8` on the job's command line reaches the replica's engine (no Ray started: the
    worker class is built as the actor pool builds it, from `worker_kwargs`)."""
    from raybooth.pipelines.batch import BatchWorker
    from raybooth.pipelines.inference import worker_kwargs

    cfg = load_config(BatchConfig, None, ["model=tiny-llm", "device=cpu", "quantization=int8"])
    worker = BatchWorker(**worker_kwargs(cfg, counter=None))
    assert weight_bytes(worker.engine.model).quantized_linears >= 14
