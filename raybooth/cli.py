"""The `raybooth` command line: one subcommand per job.

    raybooth --help
    raybooth doctor
    raybooth demo

Each subcommand is a small `add_<name>` function that declares its options and points at the function
that does the work; heavy imports (torch, ray) happen only inside those functions so `--help` is instant.
A `UserError` (bad config, missing file, server that does not answer) prints one line and exits 2;
`-v` shows the traceback and Ray's own logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from raybooth import __version__
from raybooth.cluster.job_commands import (
    JOB_SUBCOMMANDS,
    TRAIN_EPILOG,
    add_job_arguments,
    take_late_overrides,
)
from raybooth.errors import UserError

Subcommand = Callable[[argparse._SubParsersAction], None]
SUBCOMMANDS: list[Subcommand] = []


def subcommand(fn: Subcommand) -> Subcommand:
    SUBCOMMANDS.append(fn)
    return fn


def report_job(summary: Any) -> int:
    """Print a batch job's summary (stdout) and its first errors (stderr); its exit code: 1 if all rows
    failed or more than max_error_fraction of them."""
    print(summary.text())
    if summary.failed:
        print(summary.error_text(), file=sys.stderr)
    return summary.exit_code


def add_job_config_args(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """`--config FILE` plus trailing `key.sub=value` overrides, shared by every job subcommand."""
    p.add_argument(
        "--config",
        default=default_config,
        help=f"job YAML (default: {default_config or 'built-in defaults'})",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. steps=50")


# --------------------------------------------------------------------------------------------------
# Foundation subcommands
# --------------------------------------------------------------------------------------------------


@subcommand
def add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check Ray, torch, storage, MLflow and model presets",
        description="Print the cluster, device, storage, MLflow and model presets raybooth would use; "
        "exit 2 with the fix when something is broken.",
    )
    add_job_config_args(p)
    p.add_argument("--build", action="store_true", help="also build the tiny model presets that are missing")

    def run(args: argparse.Namespace) -> int:
        from raybooth.doctor import run_doctor

        return run_doctor(args.config, args.overrides, build=args.build, verbose=args.verbose)

    p.set_defaults(func=run)


@subcommand
def add_build_models(sub: argparse._SubParsersAction) -> None:
    from raybooth.models.presets import PRESETS  # light: no torch until a preset is built

    p = sub.add_parser(
        "build-models",
        help="build tiny model presets into the work dir",
        description="Build model presets (tiny seeded weights saved in diffusers/transformers format) so "
        "later jobs load them with from_pretrained. The *-arch ones are real architectures (gigabytes): "
        "build them only for GPU benchmarks.",
        epilog="presets:\n" + "\n".join(f"  {p.name:<16} {p.description}" for p in PRESETS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "presets", nargs="*", default=["tiny-sd", "tiny-vlm"], help="preset names (default: tiny-sd tiny-vlm)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster.workdir import default_models_dir
        from raybooth.models.presets import PRESETS, build_preset, preset_dir

        for name in args.presets:
            if name not in PRESETS:
                raise UserError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
        for name in args.presets:
            print(f"{name}: {build_preset(name, preset_dir(name, default_models_dir()), seed=args.seed)}")
        return 0

    p.set_defaults(func=run)


@subcommand
def add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="validate job YAMLs (with key=value overrides applied) and print the resolved values",
        description="Load each YAML with its job schema (its `kind:` or file name), apply the key=value "
        "overrides to each (a key a file's schema does not have is an error naming that file), and print "
        "the result: what a job given the same file and overrides would run with.",
        epilog="example: raybooth config configs/dreambooth.yaml steps=2 concepts.0.class_name=cat",
    )
    p.add_argument(
        "files", nargs="+", metavar="FILE|key=value", help="YAML files (e.g. configs/*.yaml), then overrides"
    )

    def run(args: argparse.Namespace) -> int:
        import yaml

        from raybooth.cluster.config import load_any_config

        # An argument with `=` that is not an existing file is an override (a file name may hold `=`).
        overrides = [a for a in args.files if "=" in a and not os.path.isfile(a)]
        files = [a for a in args.files if a not in overrides]
        if not files:
            raise UserError("no YAML file given; pass one before the overrides, e.g. configs/dreambooth.yaml")
        for path in files:
            cfg = load_any_config(path, overrides)
            applied = f" + {' '.join(overrides)}" if overrides else ""
            print(f"# {path}{applied}: {type(cfg).__name__}")
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0

    p.set_defaults(func=run)


@subcommand
def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the main job end to end on the embedded defaults",
        description="Build the tiny models, start an embedded Ray, run the main job and print where "
        "everything went (storage, MLflow, models).",
    )
    add_job_config_args(p)

    def run(args: argparse.Namespace) -> int:
        from raybooth.demo import run_demo

        return run_demo(args.config, args.overrides, verbose=args.verbose)

    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------
# Batch inference subcommands (Ray Data)
# --------------------------------------------------------------------------------------------------


@subcommand
def add_caption(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images (folder, glob, parquet, s3://) into parquet on Ray Data",
        description="Caption every image under --input with a VLM on an autoscaling pool of model replicas; "
        "write parquet rows (row_id, path, caption, model, error, timings) under --output. A rerun with the "
        "same --output skips rows already written.",
    )
    add_job_arguments(p, "caption")

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster.job_commands import load_job_config
        from raybooth.pipelines.caption import run_caption

        cfg = load_job_config("caption", args)
        return report_job(run_caption(cfg, verbose=args.verbose))

    p.set_defaults(func=run)


@subcommand
def add_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="answer an OpenAI Batch API JSONL file of chat requests on Ray Data",
        description="Read /v1/chat/completions request lines (text and image_url parts, response_format "
        "json_schema, ...) and write one OpenAI batch output line per request, in input order. A rerun with "
        "the same --output skips lines already done.",
    )
    add_job_arguments(p, "batch")

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster.job_commands import load_job_config
        from raybooth.pipelines.batch import run_batch

        cfg = load_job_config("batch", args)
        return report_job(run_batch(cfg, verbose=args.verbose))

    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------
# DreamBooth subcommands (Ray Train)
# --------------------------------------------------------------------------------------------------


@subcommand
def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="DreamBooth-train one model (one or more subjects) on Ray Train",
        description="Fine-tune Stable Diffusion on a few photos of each concept with prior preservation, "
        "checkpointing to storage and MLflow, then register the final model. Continue a stopped run with "
        "resume=<mlflow run id> or resume=<checkpoint URI> (and a larger steps=).",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_arguments(p, "train")

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster.job_commands import load_job_config
        from raybooth.pipelines.train import run_train

        return run_train(load_job_config("train", args), verbose=args.verbose)

    p.set_defaults(func=run)


@subcommand
def add_fleet(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fleet",
        help="DreamBooth-train many subjects at once, sharing the cluster",
        description="Train every subject of a fleet manifest as its own training (its own MLflow run and "
        "registered model), at most max_concurrent at a time; failures are reported, never contagious.",
    )
    add_job_arguments(p, "fleet")

    def run(args: argparse.Namespace) -> int:
        from raybooth.pipelines.fleet import run_fleet

        return run_fleet(args.config, args.overrides, verbose=args.verbose)

    p.set_defaults(func=run)


@subcommand
def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="write images from a trained model (no server needed)",
        description="Sample images from a registered model (models:/name/version, name@alias), a model "
        "folder or a preset with the same loading and sampling code the image server uses.",
    )
    p.add_argument(
        "--model", required=True, help="models:/<name>/<version>, name@alias, a folder or a preset"
    )
    p.add_argument("--prompt", required=True, help='e.g. "a photo of sks dog on the moon"')
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument(
        "--out", default="generated", help="folder or s3:// prefix for the PNGs (default: generated)"
    )
    p.add_argument("--n", type=int, default=1, help="number of images (seeds seed..seed+n-1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's training resolution)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the best available)")
    add_job_config_args(p)

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster import tracking
        from raybooth.cluster.config import DreamBoothConfig, load_config
        from raybooth.pipelines.generate import trained_resolution, write_generated_images
        from raybooth.serving.image_models import ImageModelStore, model_folder

        if args.n < 1 or args.steps < 1:
            raise UserError("--n and --steps must be at least 1")
        cfg = load_config(DreamBoothConfig, args.config, args.overrides)
        tracking.configure(cfg.tracking)
        store = ImageModelStore(
            [args.model], lora_base_model=cfg.base_model, device=args.device, dtype="auto"
        )
        located = store.locate(args.model)
        model = store.load(located)
        size = args.size or trained_resolution(model_folder(located.path)) or 512
        try:
            uris = write_generated_images(
                model.sample, args.prompt, args.out, n=args.n, seed=args.seed, steps=args.steps,
                guidance_scale=args.guidance_scale, size=size, negative_prompt=args.negative_prompt,
            )  # fmt: skip
        except ValueError as e:  # a size the UNet cannot produce, say
            raise UserError(str(e)) from e
        print(f"raybooth generate: {len(uris)} image(s) from {located.version} ({size}x{size}):")
        for uri in uris:
            print(f"  {uri}")
        return 0

    p.set_defaults(func=run)


@subcommand
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve chat and personalised images over the OpenAI HTTP API (Ray Serve)",
        description="Start Ray Serve on the configured cluster with /v1/chat/completions, "
        "/v1/images/generations and /v1/models; print the URL and routes; Ctrl-C stops it. Binding to "
        "anything but loopback needs API keys (RAYBOOTH_API_KEYS or api_keys_file).",
    )
    add_job_config_args(p, default_config="configs/serve.yaml")

    def run(args: argparse.Namespace) -> int:
        from raybooth.serving.server import run_server

        return run_server(args.config, args.overrides, verbose=args.verbose)

    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------
# Remote jobs (Ray Jobs API)
# --------------------------------------------------------------------------------------------------

ADDRESS_HELP = "Ray dashboard / Jobs API address, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS)"


def print_followed_logs(address: str | None, job_id: str) -> int:
    """Stream a job's logs until it ends; exit 0 only if it SUCCEEDED."""
    from raybooth.cluster.job_api import follow_logs, job_status

    for chunk in follow_logs(address, job_id):
        print(chunk, end="", flush=True)
    status = job_status(address, job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


@subcommand
def add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="run train/fleet/caption/batch on a remote Ray cluster",
        description="Submit a raybooth job through the Ray Jobs API with a runtime env that ships this "
        "checkout; prints the job id. Arguments submit does not know are passed to the job, e.g. "
        "`raybooth submit caption --address http://head:8265 --input s3://b/imgs --output s3://b/caps`.",
    )
    p.add_argument("job", choices=JOB_SUBCOMMANDS, help="the raybooth subcommand to run")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument(
        "--no-ship-project", action="store_true", help="use the raybooth installed in the cluster image"
    )
    p.add_argument(
        "--working-dir", default=None, help="folder uploaded as the job's working dir (default: .)"
    )
    # The job's own arguments (`--input …`, `key=value`) are whatever submit does not know; `main` collects
    # them with parse_known_args, so submit's options may come before or after the job name.
    p.set_defaults(accepts_job_args=True)

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster.jobs import submit_job

        job_id = submit_job(
            args.address,
            args.job,
            list(args.job_args),
            ship_project=not args.no_ship_project,
            working_dir=args.working_dir,
        )
        print(job_id, flush=True)
        return print_followed_logs(args.address, job_id) if args.follow else 0

    p.set_defaults(func=run)


@subcommand
def add_logs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "logs", help="print (or follow) a submitted job's logs", description="Logs of a Ray job."
    )
    p.add_argument("job_id", help="the id `raybooth submit` printed")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--follow", action="store_true", help="keep streaming until the job ends")

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster.job_api import job_logs

        if args.follow:
            return print_followed_logs(args.address, args.job_id)
        print(job_logs(args.address, args.job_id), end="")
        return 0

    p.set_defaults(func=run)


@subcommand
def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show a submitted job's status", description="Status of a Ray job.")
    p.add_argument("job_id", help="the id `raybooth submit` printed")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster.job_api import describe_job

        job = describe_job(args.address, args.job_id)
        print(f"{job.job_id}: {job.status}" + (f" ({job.message})" if job.message else ""))
        return 0

    p.set_defaults(func=run)


@subcommand
def add_stop(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stop", help="stop a submitted job", description="Stop a running Ray job.")
    p.add_argument("job_id", help="the id `raybooth submit` printed")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster.job_api import stop_job

        stopped = stop_job(args.address, args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raybooth",
        description="One Ray cluster for bulk multimodal batch inference, DreamBooth fleets and "
        "OpenAI-compatible serving.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's logs and full tracebacks")
    parser.add_argument("--version", action="version", version=f"raybooth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "accepts_job_args", False):
        args.job_args = unknown
    elif args.command in JOB_SUBCOMMANDS:
        unknown = take_late_overrides(args, unknown)
    if unknown and not getattr(args, "accepts_job_args", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        # MLflow and alembic log every store migration at INFO; keep the terminal to raybooth's own output.
        # MLflow sets its logger's level from MLFLOW_LOGGING_LEVEL when it is imported, so say it there too.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"raybooth {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"raybooth {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
