"""`raybooth demo` (what `make demo` runs): the main job end to end on the embedded defaults.

    raybooth demo [images=8]

Steps: build the tiny model presets → start an embedded Ray → draw sample images on the cluster and
write them to storage → track the run in MLflow → print where everything went.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from raybooth.cluster.config import DemoConfig, load_config


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


def run_demo(config: str | None, overrides: list[str], verbose: bool = False) -> int:
    from raybooth.cluster import storage, tracking
    from raybooth.cluster.runtime import ray_session
    from raybooth.models.presets import resolve_model

    cfg = load_config(DemoConfig, config, overrides)
    started = time.time()
    report = DemoReport()

    step("1/4 model presets (tiny, seeded, saved in diffusers/transformers format)")
    for preset in ("tiny-sd", "tiny-vlm"):
        report.add(f"model {preset}", resolve_model(preset))

    step("2/4 Ray")
    with ray_session(cfg.cluster, verbose=verbose) as info:
        report.add("ray", f"{'embedded' if info.embedded else info.address}: {info.cpus:g} CPUs, {info.gpus:g} GPUs")

        step("3/4 storage")
        root = storage.storage_root(cfg.storage)
        images_uri = storage.join(root, "demo", "images")
        uris = write_sample_images_to_storage(images_uri, cfg.images, cfg.seed)
        report.add("sample images", f"{images_uri} ({len(uris)} PNGs)")

        step("4/4 MLflow")
        uri = tracking.configure(cfg.tracking)
        with tracking.start_run(cfg.tracking.experiment, run_name="demo") as run:
            tracking.log_params({"images": cfg.images, "seed": cfg.seed, "storage_root": root})
            tracking.log_metrics({"sample_images": len(uris)}, step=0)
            run_id = run.info.run_id
        report.add("mlflow run", f"{uri} (experiment {cfg.tracking.experiment}, run {run_id})")

    report.print_summary(time.time() - started)
    return 0
