"""The job subcommands (train, fleet, caption, batch): one table of their schema, config flag, default file and
flags, read by both the CLI (`raybooth/cli.py`) and remote submission (`cluster/jobs.py`).

    raybooth train --instance-data examples/photos/dog --class-name dog steps=2
    raybooth train --config configs/dreambooth.yaml concepts.0.instance_data=photos/ steps=2

    from raybooth.cluster.job_commands import JOB_COMMANDS, load_job_config, parse_job_args
    args = parse_job_args("train", ["--instance-data", "photos/", "steps=2"])
    cfg = load_job_config("train", args)          # configs/dreambooth.yaml, then steps=2, then the flags

A flag sets one config key (`--batch-size` -> `batch_size`, `--instance-data` -> `concepts.0.instance_data`),
after the YAML and the `key=value` overrides, so what a flag says wins. Flags into a list item (the
one-subject flags of `train`) need a YAML with at most one item there: with several it is a ConfigError
that points at `concepts.N.key=value` instead.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from raybooth.cluster.config import (
    BatchConfig,
    CaptionConfig,
    DreamBoothConfig,
    FleetConfig,
    JobConfig,
    build_config,
    config_data,
    deep_merge,
)
from raybooth.errors import ConfigError, UserError


@dataclass(frozen=True)
class JobFlag:
    """`--flag VALUE` that sets one config key (dotted; a number indexes a list)."""

    flag: str
    key: str
    help: str
    type: type = str
    metavar: str | None = None


@dataclass(frozen=True)
class JobCommand:
    name: str
    schema: type[JobConfig]
    config_flag: str  # the flag naming the YAML (`--config`, a fleet's `--manifest`)
    default_config: str | None  # read when the flag is not given (relative to the cwd)
    flags: tuple[JobFlag, ...] = ()
    epilog: str | None = None


_INFERENCE_FLAGS = (
    JobFlag("--input", "input", "folder, glob, parquet file/folder, JSONL or s3:// prefix to read"),
    JobFlag("--output", "output", "folder, file or s3:// prefix to write"),
    JobFlag("--model", "model", "tiny-vlm (default), a local model folder or a hub id"),
    JobFlag(
        "--max-error-fraction",
        "max_error_fraction",
        "exit 1 when more than this share of rows fail (0: any; default 1: only when all do)",
        float,
        metavar="F",
    ),
)

TRAIN_EPILOG = """\
one subject from the command line (sets concepts.0 of the YAML, which must have at most one concept):
  raybooth train --instance-data photos/ --class-name dog [--identifier sks] steps=400

any key, list items by index (concepts.1.* appends a second subject):
  raybooth train --config configs/dreambooth.yaml concepts.0.instance_data=photos/ steps=400
  raybooth train concepts.1.instance_data=photos/cat concepts.1.class_name=cat

order: the YAML, then key=value overrides, then the flags above.
"""

JOB_COMMANDS: dict[str, JobCommand] = {
    "train": JobCommand(
        "train",
        DreamBoothConfig,
        "--config",
        "configs/dreambooth.yaml",
        (
            JobFlag("--instance-data", "concepts.0.instance_data", "folder or s3:// prefix with 3-5 photos"),
            JobFlag("--class-name", "concepts.0.class_name", "what the subject is, e.g. dog"),
            JobFlag("--identifier", "concepts.0.identifier", "rare token that will mean the subject (sks)"),
            JobFlag(
                "--instance-prompt", "concepts.0.instance_prompt", 'e.g. "a photo of {identifier} {class}"'
            ),
            JobFlag("--class-prompt", "concepts.0.class_prompt", 'e.g. "a photo of {class}"'),
            JobFlag("--num-class-images", "concepts.0.num_class_images", "prior-preservation images", int),
        ),
        TRAIN_EPILOG,
    ),
    "fleet": JobCommand("fleet", FleetConfig, "--manifest", "configs/fleet.yaml"),
    "caption": JobCommand(
        "caption",
        CaptionConfig,
        "--config",
        None,
        (
            *_INFERENCE_FLAGS,
            JobFlag(
                "--prompt", "prompt", 'instruction sent with every image (default "Describe the image.")'
            ),
            JobFlag("--batch-size", "batch_size", "rows per model batch at most", int),
            JobFlag(
                "--replicas", "replicas", "model replicas the actor pool scales between", metavar="MIN:MAX"
            ),
            JobFlag("--max-new-tokens", "max_new_tokens", "caption length cap in tokens", int),
        ),
    ),
    "batch": JobCommand("batch", BatchConfig, "--config", None, _INFERENCE_FLAGS),
}
JOB_SUBCOMMANDS = tuple(JOB_COMMANDS)


def job_command(name: str) -> JobCommand:
    if name not in JOB_COMMANDS:
        raise UserError(f"`{name}` does not run as a job; use one of: {', '.join(JOB_SUBCOMMANDS)}")
    return JOB_COMMANDS[name]


def flag_dest(flag: JobFlag) -> str:
    return flag.flag[2:].replace("-", "_")


def add_job_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """The job's config flag, its own flags and the trailing `key=value` overrides."""
    cmd = job_command(name)
    default = cmd.default_config
    p.add_argument(
        cmd.config_flag,
        dest="config",
        default=default,
        help=f"job YAML (default: {default or 'built-in defaults'})",
    )
    for f in cmd.flags:
        p.add_argument(f.flag, type=f.type, metavar=f.metavar, help=f"{f.help} (sets {f.key})")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys, e.g. steps=50 or concepts.0.class_name=cat",
    )


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def parse_job_args(name: str, argv: list[str]) -> argparse.Namespace:
    """A job's argv parsed exactly as the CLI parses it; a mistake is a UserError, never an exit."""
    p = _RaisingParser(prog=f"raybooth {name}", add_help=False)
    add_job_arguments(p, name)
    args, unknown = p.parse_known_args(argv)
    rest = take_late_overrides(args, unknown)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def take_late_overrides(args: argparse.Namespace, unknown: list[str]) -> list[str]:
    """Move `key=value` tokens argparse left over into `args.overrides`; return what is still unknown.

    argparse fills a `nargs="*"` positional once, so in `--config a steps=2 --input x seed=3` the `seed=3`
    after a flag comes back unknown; it is an override all the same."""
    late = [a for a in unknown if "=" in a and not a.startswith("-")]
    args.overrides = [*(args.overrides or []), *late]
    return [a for a in unknown if a not in late]


def given_flags(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """{flag: value} of the job's flags that were given."""
    return {
        f.flag: getattr(args, flag_dest(f))
        for f in job_command(name).flags
        if getattr(args, flag_dest(f)) is not None
    }


def flag_tree(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The given flags as a config tree (`{"concepts": {"0": {"class_name": "dog"}}}`), values as typed."""
    tree: dict[str, Any] = {}
    keys = {f.flag: f.key for f in job_command(name).flags}
    for flag, value in given_flags(name, args).items():
        *parents, leaf = keys[flag].split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def load_job_config(name: str, args: argparse.Namespace) -> JobConfig:
    """The config a job runs with: its YAML, then `key=value` overrides, then its flags."""
    cmd = job_command(name)
    data, source = config_data(args.config, args.overrides or None)
    flags = flag_tree(name, args)
    if flags:
        for key, value in flags.items():
            if isinstance(value, dict) and "0" in value and len(data.get(key) or []) > 1:
                used = ", ".join(
                    f.flag
                    for f in cmd.flags
                    if f.key.startswith(f"{key}.0.") and f.flag in given_flags(name, args)
                )
                raise ConfigError(
                    f"{used} set the one item of {key}, but {source} has {len(data[key])}; "
                    f"set each with {key}.<index>.<key>=value overrides instead"
                )
        data = deep_merge(data, flags)
        source = f"{source} + flags"
    return build_config(cmd.schema, data, source)
