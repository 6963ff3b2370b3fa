"""The image route draws with every diffusion family through the official `openai` client: tiny-sdxl,
tiny-sd3 and tiny-flux registered in MLflow next to the session's subjects, served by the session's app
(the image replica loads each on first use; nothing is redeployed).

    .venv/bin/python -m pytest tests/serving/test_families.py
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import ServeApp, _register

pytestmark = pytest.mark.slow
FAMILIES = {"tiny-sdxl": "StableDiffusionXLPipeline", "tiny-sd3": "StableDiffusion3Pipeline",
            "tiny-flux": "FluxPipeline"}  # fmt: skip


@pytest.fixture(scope="module")
def family_models(serve_app: ServeApp) -> dict[str, str]:
    """Registered model name per preset (each preset built into the session's models dir)."""
    from pathlib import Path

    from raybooth.cluster.workdir import default_models_dir
    from raybooth.models.presets import resolve_model

    names = {}
    for preset in FAMILIES:
        folder = Path(resolve_model(preset, kind="sd", models_dir=default_models_dir()))
        names[preset] = f"family-{preset}"
        _register(folder, names[preset])
    return names


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_the_image_route_draws_with_each_family(serve_app, family_models, preset):
    import json

    from raybooth.cluster import tracking

    folder = tracking.download_model(f"models:/{family_models[preset]}/1")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == FAMILIES[preset]
    result = serve_app.openai().images.generate(
        model=family_models[preset], prompt="a photo of sks dog", size="64x64", response_format="b64_json",
        extra_body={"seed": 3, "num_inference_steps": 2},
    )  # fmt: skip
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))), dtype=np.float32)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 1
