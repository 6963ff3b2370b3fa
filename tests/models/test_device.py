"""Device choice and precision plans, including the fallbacks and the notes that explain them."""

from __future__ import annotations

import pytest
import torch

from raybooth.errors import ModelError
from raybooth.models import device as device_mod
from raybooth.models.device import as_dtype, autocast, make_grad_scaler, pick_device, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_pick_device(monkeypatch):
    assert pick_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == CPU
    with pytest.raises(ModelError, match="no CUDA GPU.*use device: auto or cpu"):
        pick_device("cuda")
    with pytest.raises(ModelError, match="unknown device 'tpu'; use auto, cpu, cuda or cuda:N"):
        pick_device("tpu")


def test_no_mixed_precision_is_plain_fp32():
    plan = resolve_precision("no", CPU)
    assert (plan.autocast_dtype, plan.use_grad_scaler, plan.frozen_dtype, plan.note) == (
        None,
        False,
        torch.float32,
        None,
    )


def test_fp16_on_cpu_falls_back_to_fp32_and_says_so():
    plan = resolve_precision("fp16", "cpu")
    assert plan.autocast_dtype is None and not plan.use_grad_scaler and plan.frozen_dtype == torch.float32
    assert plan.requested == "fp16" and plan.effective == "no"
    assert "needs a CUDA GPU" in plan.note and "bf16" in plan.note
    assert not make_grad_scaler(plan).is_enabled()


def test_bf16_on_cpu_autocasts():
    plan = resolve_precision("bf16", CPU)
    assert (plan.device_type, plan.autocast_dtype, plan.use_grad_scaler, plan.note) == (
        "cpu",
        torch.bfloat16,
        False,
        None,
    )
    layer = torch.nn.Linear(4, 4)
    with autocast(plan):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    with autocast(resolve_precision("no", CPU)):
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_gpu_plans(monkeypatch):
    fp16 = resolve_precision("fp16", CUDA)
    assert (fp16.autocast_dtype, fp16.use_grad_scaler, fp16.frozen_dtype, fp16.note) == (
        torch.float16,
        True,
        torch.float16,
        None,
    )
    monkeypatch.setattr(device_mod, "_cuda_supports_bf16", lambda: True)
    assert resolve_precision("bf16", CUDA).autocast_dtype == torch.bfloat16
    monkeypatch.setattr(device_mod, "_cuda_supports_bf16", lambda: False)  # a V100 or T4
    old_gpu = resolve_precision("bf16", CUDA)
    assert old_gpu.effective == "fp16" and old_gpu.use_grad_scaler
    assert "not supported by this GPU" in old_gpu.note


def test_bad_values_name_the_choices():
    with pytest.raises(ModelError, match="unknown mixed_precision 'fp8'; use one of no, fp16, bf16"):
        resolve_precision("fp8", CPU)
    with pytest.raises(ModelError, match="unknown dtype 'int3'"):
        as_dtype("int3")
    assert as_dtype("bfloat16") == torch.bfloat16 and as_dtype(None) is None


@pytest.mark.gpu
def test_fp16_plan_runs_on_a_real_gpu():
    plan = resolve_precision("fp16", pick_device("auto"))
    layer = torch.nn.Linear(4, 4).cuda()
    scaler = make_grad_scaler(plan)
    with autocast(plan):
        loss = layer(torch.ones(2, 4, device="cuda")).float().pow(2).mean()
    scaler.scale(loss).backward()
    assert scaler.is_enabled() and layer.weight.grad is not None
