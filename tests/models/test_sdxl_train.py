"""SDXL DreamBooth end to end on the shared embedded Ray cluster: tiny-sdxl, LoRA on the UNet and both
text encoders, 2 Ray Train workers, prior preservation with class images drawn by the SDXL sampler, then
`raybooth generate` from the registered model.

    .venv/bin/python -m pytest tests/models/test_sdxl_train.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raybooth.cli import main
from raybooth.cluster import storage
from raybooth.cluster.config import DreamBoothConfig
from raybooth.pipelines.train import launch_training
from raybooth.samples import write_sample_images

pytestmark = pytest.mark.slow


def test_sdxl_lora_trains_on_two_workers_and_generates(ray_cluster, tmp_path):
    subject = tmp_path / "subject"
    write_sample_images(subject, 2, size=48)
    cfg = DreamBoothConfig.model_validate(
        dict(
            base_model="tiny-sdxl",
            train_mode="lora",
            text_encoder_lr=1e-3,  # LoRA on both CLIP encoders too
            concepts=[{"instance_data": str(subject), "class_name": "dog", "num_class_images": 2}],
            resolution=32,
            steps=2,
            checkpoint_every=2,
            learning_rate=1e-3,
            sample_steps=2,
            sample_guidance_scale=2.0,
            validation_prompts=["a photo of sks dog on the moon"],
            num_workers=2,
            model_name="sdxl-lora",
            tracking={"experiment": "sdxl-lora"},
        )
    )
    result = launch_training(cfg)
    assert result.steps == 2 and result.loss is not None and np.isfinite(result.loss)
    # The checkpoint holds the adapters of all three trained modules.
    files = set(storage.list_files(result.checkpoint, [".safetensors"]))
    assert {Path(f).name for f in files} == {
        "unet.safetensors",
        "text_encoder.safetensors",
        "text_encoder_2.safetensors",
    }

    out = tmp_path / "out"
    args = ["--model", result.model_uri, "--prompt", "a photo of sks dog", "--steps", "2", "--size", "64"]
    assert main(["generate", *args, "--out", str(out)]) == 0
    (png,) = out.iterdir()
    image = np.asarray(Image.open(png), dtype=np.float32)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 1
