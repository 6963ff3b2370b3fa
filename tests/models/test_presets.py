"""Presets: deterministic and atomic builds, name/path/hub-id resolution, errors, SD 1.5 size on meta."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from raybooth.errors import ModelError
from raybooth.models import sd_presets
from raybooth.models.presets import PRESETS, build_preset, preset_status, read_marker, resolve_model


def file_hashes(folder: Path, pattern: str = "*") -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob(pattern))
        if p.is_file()
    }


def test_presets_are_named_with_kinds():
    assert {name: p.kind for name, p in PRESETS.items()} == {
        "tiny-sd": "sd",
        "tiny-vlm": "vlm",
        "tiny-qwen2.5-vl": "vlm",
        "tiny-llm": "vlm",
        "sd15-arch": "sd",
        "tiny-sdxl": "sd",
        "tiny-sd3": "sd",
        "tiny-flux": "sd",
        "tiny-smolvlm": "vlm",
        "tiny-llava-next": "vlm",
        "tiny-mllama": "vlm",
        "tiny-florence2": "vlm",
        "tiny-qwen3-vl": "vlm",
        "tiny-idefics2": "vlm",
        "tiny-llava-onevision": "vlm",
        "tiny-paligemma": "vlm",
        "tiny-mistral3": "vlm",
        "sdxl-arch": "sd",
        "flux-arch": "sd",
    }
    assert all(p.description for p in PRESETS.values())


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-vlm"])
def test_same_seed_builds_identical_bytes(name, tmp_path, tiny_sd_path, tiny_vlm_path):
    first = {"tiny-sd": tiny_sd_path, "tiny-vlm": tiny_vlm_path}[name]
    again = build_preset(name, tmp_path / name, seed=0)
    assert again == (tmp_path / name).resolve()
    hashes = file_hashes(again)
    assert any(f.endswith(".safetensors") for f in hashes)
    assert hashes == file_hashes(first)  # weights, configs and tokenizer files alike


def test_other_seed_gives_other_weights(tmp_path, tiny_sd_path):
    other = build_preset("tiny-sd", tmp_path / "tiny-sd", seed=1)
    seed0, seed1 = file_hashes(tiny_sd_path, "*.safetensors"), file_hashes(other, "*.safetensors")
    assert seed0.keys() == seed1.keys() and len(seed0) == 3  # unet, vae, text_encoder
    assert all(seed0[f] != seed1[f] for f in seed0)
    assert read_marker(other)["seed"] == 1


def test_building_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_preset("tiny-vlm", tmp_path / "vlm")
    assert torch.equal(torch.rand(3), expected)


def test_failed_build_leaves_nothing_that_looks_done(tmp_path, monkeypatch):
    save = StableDiffusionPipeline.save_pretrained

    def save_then_crash(self, *args, **kwargs):
        save(self, *args, **kwargs)  # every weight file is written...
        raise RuntimeError("disk full")  # ...and the build still fails before it is marked done

    monkeypatch.setattr(sd_presets.StableDiffusionPipeline, "save_pretrained", save_then_crash)
    dest = tmp_path / "models" / "tiny-sd"
    with pytest.raises(RuntimeError, match="disk full"):
        build_preset("tiny-sd", dest)
    assert not dest.exists()
    assert list((tmp_path / "models").iterdir()) == []  # the hidden build folder is cleaned up too

    monkeypatch.undo()
    assert (build_preset("tiny-sd", dest) / "model_index.json").is_file()


def test_rebuild_is_a_noop_and_other_seed_replaces(tmp_path):
    dest = build_preset("tiny-vlm", tmp_path / "vlm", seed=0)
    stamp = (dest / "model.safetensors").stat().st_mtime_ns
    assert build_preset("tiny-vlm", dest, seed=0) == dest
    assert (dest / "model.safetensors").stat().st_mtime_ns == stamp
    build_preset("tiny-vlm", dest, seed=2)
    assert read_marker(dest)["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlm"]  # the old build is gone


def test_build_never_overwrites_a_foreign_folder(tmp_path):
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not a raybooth preset build"):
        build_preset("tiny-sd", mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_resolve_builds_a_preset_on_first_use_in_the_models_dir_it_is_given(tmp_path):
    models_dir = tmp_path / "models"
    assert not next(r for r in preset_status(models_dir) if r["name"] == "tiny-vlm")["built"]
    path = resolve_model("tiny-vlm", kind="vlm", models_dir=models_dir)
    assert Path(path) == models_dir.resolve() / "tiny-vlm"
    assert (Path(path) / "config.json").is_file()
    status = {r["name"]: r for r in preset_status(models_dir)}
    assert status["tiny-vlm"]["built"] and status["tiny-vlm"]["path"] == path
    assert not status["sd15-arch"]["built"] and status["sd15-arch"]["kind"] == "sd"


def test_resolve_local_folders_and_hub_ids(tmp_path, tiny_sd_path):
    assert resolve_model(str(tiny_sd_path), kind="sd") == str(tiny_sd_path.resolve())
    assert resolve_model("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"


@pytest.mark.parametrize(
    ("reference", "kind", "message"),
    [
        ("tiny-xl", None, "unknown preset 'tiny-xl'; choose from tiny-sd, tiny-vlm, sd15-arch"),
        ("/no/such/model", None, "model folder /no/such/model does not exist"),
        ("./models/nope", None, "does not exist"),
        ("tiny-vlm", "sd", "preset 'tiny-vlm' is a vision-language model, but a Stable Diffusion pipeline"),
        ("tiny-sd", "audio", "unknown model kind 'audio'"),
    ],
)
def test_resolve_errors_name_the_fix(reference, kind, message, tmp_path):
    with pytest.raises(ModelError, match=message.replace("(", r"\(")):
        resolve_model(reference, kind=kind, models_dir=tmp_path)


def test_a_preset_name_needs_a_models_dir(tmp_path):
    """models/ reads no work dir: where presets live is always the caller's to say."""
    with pytest.raises(ModelError, match="'tiny-sd' is a preset, and no models_dir says where"):
        resolve_model("tiny-sd", kind="sd")
    assert not any(tmp_path.iterdir())


def test_resolve_refuses_a_folder_of_the_wrong_kind(tiny_sd_path, tmp_path):
    with pytest.raises(ModelError, match="not a vision-language model folder \\(no config.json\\)"):
        resolve_model(str(tiny_sd_path), kind="vlm")
    weights = tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(weights))


def test_sd15_architecture_has_sd15_parameter_counts_on_meta():
    # The real SD 1.5 counts; built on the meta device, so no memory is allocated for 1B parameters.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd_presets.SD15.unet)
        vae = AutoencoderKL(**sd_presets.SD15.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**sd_presets.SD15.text_encoder))
    assert {p.device.type for p in unet.parameters()} == {"meta"}
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480


def count(module: torch.nn.Module) -> int:
    assert {p.device.type for p in module.parameters()} == {"meta"}
    return sum(p.numel() for p in module.parameters())


def test_sdxl_and_flux_architectures_have_the_published_parameter_counts_on_meta():
    """sdxl-arch and flux-arch are the real architectures: SDXL base's UNet (2.6B) and text towers, FLUX.1-dev's
    transformer (11.9B), T5-XXL encoder and VAE. On the meta device: no memory for 20B parameters."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from raybooth.models import flow_presets

    sdxl, flux = sd_presets.SD_ARCHITECTURES["sdxl-arch"], flow_presets.FLUX_DEV
    with torch.device("meta"):
        assert count(UNet2DConditionModel(**sdxl.unet)) == 2_567_463_684
        assert count(AutoencoderKL(**sdxl.vae)) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig(**sdxl.text_encoder))) == 123_060_480
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**sdxl.text_encoder_2))) == 694_659_840
        assert count(FluxTransformer2DModel(**flux.transformer)) == 11_901_408_320
        assert count(T5EncoderModel(T5Config(**flux.t5))) == 4_762_310_656
        assert count(AutoencoderKL(**flux.vae)) == 83_819_683
        assert count(CLIPTextModel(CLIPTextConfig(**flux.clip))) == 123_060_480
    assert flow_presets.WRITERS["flux-arch"] and flux.dtype == torch.bfloat16
