"""`raybooth demo` (what `make demo` runs): the main job end to end on the embedded defaults.

    raybooth demo [images=8] [base_model=tiny-flux]   # any tiny family: tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux

Steps: build the tiny model presets → start an embedded Ray → draw sample images on the cluster and
write them to storage → caption them (Ray Data) → track the run in MLflow → DreamBooth a tiny subject
(Ray Train) and register it → serve it → print where everything went.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from raybooth.cluster.config import DemoConfig, load_config
from raybooth.cluster.workdir import default_models_dir

if TYPE_CHECKING:
    from raybooth.pipelines.progress import JobSummary
    from raybooth.pipelines.train import TrainResult


@dataclass
class DemoReport:
    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, what: str, where: str) -> None:
        self.lines.append((what, where))
        print(f"  {what}: {where}", flush=True)

    def print_summary(self, seconds: float) -> None:
        width = max(len(w) for w, _ in self.lines)
        print(f"\nraybooth demo finished in {seconds:.1f}s. Where everything went:")
        for what, where in self.lines:
            print(f"  {what:<{width}}  {where}")


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def write_sample_images_to_storage(root: str, count: int, seed: int) -> list[str]:
    """Draw and write the sample images as Ray tasks, one per image, straight into storage."""
    import ray

    from raybooth.cluster import storage
    from raybooth.samples import draw_sample_image, png_bytes

    @ray.remote(num_cpus=0.25)
    def draw_and_write(index: int) -> str:
        uri = storage.join(root, f"img_{index:05d}.png")
        storage.write_bytes_atomic(uri, png_bytes(draw_sample_image(index, seed=seed)))
        return uri

    return ray.get([draw_and_write.remote(i) for i in range(count)])


def caption_sample_images(cfg: DemoConfig, images_uri: str, output_uri: str) -> JobSummary:
    """Caption the sample images with the batch captioning job (a rerun of the demo resumes it)."""
    from raybooth.cluster.config import CaptionConfig
    from raybooth.pipelines.caption import run_caption

    caption_cfg = CaptionConfig(
        input=images_uri,
        output=output_uri,
        cluster=cfg.cluster,
        storage=cfg.storage,
        max_new_tokens=16,  # the tiny model's captions are random text: a few words show the path works
        seed=cfg.seed,
    )
    return run_caption(caption_cfg)


def serve_and_ask(cfg: DemoConfig, image_model: str, report: DemoReport) -> None:
    """Serve `image_model` and tiny-vlm over the OpenAI API, send one request of each kind, print the answers."""
    import base64
    import socket

    from ray import serve

    from raybooth.cluster.config import ServeConfig
    from raybooth.cluster.runtime import free_port
    from raybooth.errors import UserError
    from raybooth.serving.server import start_server

    try:
        import openai
    except ImportError as e:
        raise UserError("the demo's serving step uses the openai client: pip install openai") from e
    with socket.socket() as s:  # 8000 unless something already listens there
        port = 8000 if s.connect_ex(("127.0.0.1", 8000)) else 0
    port = port or free_port()
    # Resources are the serve defaults (they fit a 2-core laptop); start_server checks them first.
    serve_cfg = ServeConfig(
        cluster=cfg.cluster, storage=cfg.storage, tracking=cfg.tracking, port=port, image_models=[image_model],
        image={"default_size": "64x64", "default_steps": 8}, chat={"default_max_tokens": 16},
    )  # fmt: skip
    url = start_server(serve_cfg)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback")
        report.add("serve", f"{url}/v1 (models: {', '.join(m.id for m in client.models.list().data)})")
        image = client.images.generate(
            model=image_model, prompt="a photo of sks dog on the beach", size="64x64", response_format="b64_json",
            extra_body={"seed": cfg.seed},
        )  # fmt: skip
        png = base64.b64decode(image.data[0].b64_json)
        report.add("images.generate", f"{image_model}: a {len(png)}-byte 64x64 PNG")
        from raybooth.samples import draw_sample_image, png_bytes

        photo = base64.b64encode(png_bytes(draw_sample_image(0, seed=cfg.seed))).decode()
        question = [
            {"type": "text", "text": "Describe the image in one sentence."},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{photo}"}},
        ]
        chat = client.chat.completions.create(
            model="tiny-vlm", messages=[{"role": "user", "content": question}], max_tokens=16, seed=cfg.seed,
        )  # fmt: skip
        answer = f"{chat.choices[0].message.content!r} ({chat.usage.completion_tokens} tokens)"
        report.add("chat.completions", answer)
    finally:
        serve.shutdown()


def train_demo_subject(cfg: DemoConfig, root: str) -> TrainResult:
    """DreamBooth a tiny subject (3 sample photos) with 2 DDP workers (1 on a 1-CPU machine), and register it."""
    from raybooth.cluster import storage
    from raybooth.cluster.config import DreamBoothConfig
    from raybooth.cluster.runtime import cluster_info
    from raybooth.pipelines.train import launch_training
    from raybooth.samples import draw_sample_image, png_bytes

    subject = storage.join(root, "demo", "subject")  # where configs/dreambooth.yaml looks too
    for i in range(3):
        storage.write_bytes_atomic(
            storage.join(subject, f"photo_{i}.png"), png_bytes(draw_sample_image(100 + i, seed=cfg.seed))
        )
    train_cfg = DreamBoothConfig(
        cluster=cfg.cluster, storage=cfg.storage, tracking=cfg.tracking, seed=cfg.seed,
        base_model=cfg.base_model,  # the family's default train_mode (full for SD/SDXL, LoRA for SD3/Flux)
        concepts=[{"instance_data": subject, "class_name": "dog", "num_class_images": 4}],
        steps=10, checkpoint_every=5, learning_rate=1e-4,  # a few steps show every part; the subject stays random
        sample_steps=4, num_workers=2 if cluster_info().cpus >= 2 else 1, model_name="raybooth-demo-subject",
        validation_prompts=["a photo of sks dog on the beach"],
    )  # fmt: skip
    return launch_training(train_cfg)


def run_demo(config: str | None, overrides: list[str], verbose: bool = False) -> int:
    from raybooth.cluster import storage, tracking
    from raybooth.cluster.runtime import ray_session, resolve_address
    from raybooth.models.loaders import sd_family
    from raybooth.models.presets import resolve_model
    from raybooth.serving.high_throughput import high_throughput_env

    cfg = load_config(DemoConfig, config, overrides)
    started = time.time()
    report = DemoReport()

    step("1/7 model presets (tiny, seeded, saved in diffusers/transformers format)")
    family = sd_family(cfg.base_model, models_dir=default_models_dir())  # one line, exit 2, before Ray
    for preset in (cfg.base_model, "tiny-vlm"):
        report.add(f"model {preset}", resolve_model(preset, models_dir=default_models_dir()))
    report.add("family", family.name)

    step("2/7 Ray")
    # The serving step's Serve in its high-throughput mode (ServeConfig's default ingress.high_throughput).
    env = high_throughput_env() if resolve_address(cfg.cluster) is None else None
    with ray_session(cfg.cluster, verbose=verbose, env=env) as info:
        report.add(
            "ray", f"{'embedded' if info.embedded else info.address}: {info.cpus:g} CPUs, {info.gpus:g} GPUs"
        )

        step("3/7 storage")
        root = storage.storage_root(cfg.storage)
        images_uri = storage.join(root, "demo", "images")
        uris = write_sample_images_to_storage(images_uri, cfg.images, cfg.seed)
        report.add("sample images", f"{images_uri} ({len(uris)} PNGs)")

        step("4/7 captions (Ray Data: decode on CPU tasks, tiny-vlm on an actor pool)")
        captions = caption_sample_images(cfg, images_uri, storage.join(root, "demo", "captions"))
        report.add(
            "captions",
            f"{captions.output} ({captions.rows - captions.failed} captioned, {captions.failed} failed, "
            f"{captions.skipped} already done; {captions.rows_per_s:.1f} rows/s)",
        )

        step("5/7 MLflow")
        uri = tracking.configure(cfg.tracking)
        with tracking.start_run(cfg.tracking.experiment, run_name="demo") as run:
            tracking.log_params({"images": cfg.images, "seed": cfg.seed, "storage_root": root})
            tracking.log_metrics({"sample_images": len(uris)}, step=0)
            run_id = run.info.run_id
        report.add("mlflow run", f"{uri} (experiment {cfg.tracking.experiment}, run {run_id})")

        step("6/7 DreamBooth (Ray Train: 2 workers, prior preservation, checkpoints, MLflow registry)")
        trained = train_demo_subject(cfg, root)
        report.add("dreambooth", f"{trained.model_uri} (run {trained.run_id}, loss {trained.loss:.4f}, "
                   f"{trained.seconds:.0f}s; checkpoint {trained.checkpoint})")  # fmt: skip

        step("7/7 serving (Ray Serve, OpenAI API: one image and one chat request through the openai client)")
        serve_and_ask(cfg, image_model=trained.model_name, report=report)

    report.print_summary(time.time() - started)
    return 0
