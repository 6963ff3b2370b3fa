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
import sys
import traceback
from collections.abc import Callable

from raybooth import __version__
from raybooth.errors import UserError

Subcommand = Callable[[argparse._SubParsersAction], None]
SUBCOMMANDS: list[Subcommand] = []


def subcommand(fn: Subcommand) -> Subcommand:
    SUBCOMMANDS.append(fn)
    return fn


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
        from raybooth.cluster.doctor import run_doctor

        return run_doctor(args.config, args.overrides, build=args.build, verbose=args.verbose)

    p.set_defaults(func=run)


@subcommand
def add_build_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-models",
        help="build tiny model presets into the work dir",
        description="Build model presets (tiny seeded weights saved in diffusers/transformers format) so "
        "later jobs load them with from_pretrained. sd15-arch is large: build it only for GPU benchmarks.",
    )
    p.add_argument("presets", nargs="*", default=["tiny-sd", "tiny-vlm"], help="preset names (default: tiny ones)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")

    def run(args: argparse.Namespace) -> int:
        from raybooth.models.presets import PRESETS, build_preset

        for name in args.presets:
            if name not in PRESETS:
                raise UserError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
        for name in args.presets:
            print(f"{name}: {build_preset(name, seed=args.seed)}")
        return 0

    p.set_defaults(func=run)


@subcommand
def add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="validate job YAMLs and print the resolved values",
        description="Load each YAML with its job schema (its `kind:` or file name) and print the result.",
    )
    p.add_argument("files", nargs="+", help="YAML files, e.g. configs/*.yaml")

    def run(args: argparse.Namespace) -> int:
        import yaml

        from raybooth.cluster.config import load_any_config

        for path in args.files:
            cfg = load_any_config(path)
            print(f"# {path}: {type(cfg).__name__}")
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
    p.add_argument("--input", help="folder, glob, parquet file/folder or s3:// prefix of images")
    p.add_argument("--output", help="folder or s3:// prefix for the parquet parts")
    p.add_argument("--model", help="tiny-vlm (default), a local model folder or a hub id")
    p.add_argument("--prompt", help='instruction sent with every image (default "Describe the image.")')
    p.add_argument("--batch-size", type=int, help="rows per model batch at most")
    p.add_argument("--replicas", metavar="MIN:MAX", help="model replicas the actor pool scales between")
    p.add_argument("--max-new-tokens", type=int, help="caption length cap in tokens")
    add_job_config_args(p)

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster.config import CaptionConfig
        from raybooth.pipelines.caption import run_caption
        from raybooth.pipelines.inference import load_inference_config

        names = ("input", "output", "model", "prompt", "batch_size", "replicas", "max_new_tokens")
        flags = {name: getattr(args, name) for name in names}
        cfg = load_inference_config(CaptionConfig, args.config, args.overrides, flags)
        print(run_caption(cfg, verbose=args.verbose).text())
        return 0

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
    p.add_argument("--input", help="requests JSONL, local or s3://")
    p.add_argument("--output", help="results JSONL, local or s3://")
    p.add_argument("--model", help="tiny-vlm (default), a local model folder or a hub id")
    add_job_config_args(p)

    def run(args: argparse.Namespace) -> int:
        from raybooth.cluster.config import BatchConfig
        from raybooth.pipelines.batch import run_batch
        from raybooth.pipelines.inference import load_inference_config

        flags = {k: getattr(args, k) for k in ("input", "output", "model")}
        cfg = load_inference_config(BatchConfig, args.config, args.overrides, flags)
        print(run_batch(cfg, verbose=args.verbose).text())
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
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        # MLflow and alembic log every store migration at INFO; keep the terminal to raybooth's own output.
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
