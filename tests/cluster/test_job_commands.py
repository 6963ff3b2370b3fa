"""The job subcommand table: train's one-subject flags, flags derived from path marks, and the argv a
submitted job runs with, parsed by the same argparse definitions as the CLI.

    .venv/bin/python -m pytest tests/cluster/test_job_commands.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from raybooth.cli import build_parser
from raybooth.cluster import job_api, jobs
from raybooth.cluster.config import JobConfig, path_mark
from raybooth.cluster.job_commands import JOB_COMMANDS, JOB_SUBCOMMANDS, load_job_config, parse_job_args
from raybooth.cluster.job_paths import local_path_problems
from raybooth.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[2]
REMOTE = "http://198.51.100.7:8265"  # TEST-NET-2: never this machine, so no connection is attempted


def train_config(argv: list[str]):
    return load_job_config("train", parse_job_args("train", argv))


def test_train_flags_set_the_one_subject():
    cfg = train_config(["--instance-data", "photos/", "--class-name", "cat", "--identifier", "zwx"])
    (concept,) = cfg.concepts
    assert (concept.instance_data, concept.class_name) == ("photos/", "cat")
    # the committed YAML's prompt names {identifier}, so --identifier alone renames the subject
    assert concept.resolved_instance_prompt == "a photo of zwx cat"


def test_train_flags_replace_fields_of_the_yaml_concept_and_win_over_overrides(tmp_path):
    path = tmp_path / "db.yaml"
    path.write_text("concepts: [{instance_data: old/, class_name: dog, num_class_images: 3}]\n")
    cfg = train_config(
        ["--config", str(path), "--instance-data", "new/", "concepts.0.instance_data=over/", "steps=2"]
    )
    (concept,) = cfg.concepts
    assert concept.instance_data == "new/" and concept.num_class_images == 3 and cfg.steps == 2


def test_train_flags_with_several_yaml_concepts_are_refused(tmp_path):
    path = tmp_path / "db.yaml"
    path.write_text("concepts: [{instance_data: a/}, {instance_data: b/}]\n")
    with pytest.raises(
        ConfigError, match=r"--class-name set the one item of concepts, but .* has 2.*concepts\.<index>"
    ):
        train_config(["--config", str(path), "--class-name", "cat"])


def test_train_help_shows_the_flags_and_index_overrides(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "--instance-data" in out and "--class-name" in out and "--identifier" in out
    assert "raybooth train --instance-data photos/ --class-name dog" in out
    assert "concepts.0.instance_data=photos/" in out


def test_submit_choices_and_job_schemas_come_from_one_table():
    action = next(a for a in build_parser()._actions if a.dest == "command")
    submit = action.choices["submit"]
    job = next(a for a in submit._actions if a.dest == "job")
    assert tuple(job.choices) == JOB_SUBCOMMANDS == tuple(JOB_COMMANDS)
    assert jobs.JOB_SUBCOMMANDS is JOB_SUBCOMMANDS


def test_data_flags_are_the_flags_whose_field_is_marked_data():
    assert [f.flag for f in jobs._data_flags("caption")] == ["--input", "--output"]
    assert [f.flag for f in jobs._data_flags("batch")] == ["--input", "--output"]


class WithWeights(JobConfig):
    weights_dir: str = Field("", json_schema_extra=path_mark("data"))
    note: str = Field("", description="not a path, whatever its value")


def test_the_remote_path_check_reads_the_schema_mark():
    cfg = WithWeights(weights_dir="./weights", note="./weights")
    keys = [key for key, _ in local_path_problems(cfg)]
    assert keys == ["weights_dir"]  # the unmarked field holding the same text is not checked
    assert local_path_problems(WithWeights(weights_dir="s3://b/w")) == []


def test_a_local_photo_flag_for_a_remote_cluster_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(
        UserError, match=r"concepts\.0\.instance_data=photos/ is a path.*e\.g\. --instance-data s3://"
    ):
        jobs.submit_job(
            REMOTE, "train", ["--instance-data", "photos/", "storage.root=s3://b/run"], working_dir=REPO
        )


def test_job_argv_is_rebuilt_from_the_parsed_args(tmp_path):
    parsed = parse_job_args("caption", ["k=v", "--input", "s3://b/i", "--prompt", "style=terse", "seed=3"])
    assert jobs._job_argv("caption", parsed) == [
        "--input",
        "s3://b/i",
        "--prompt",
        "style=terse",
        "k=v",
        "seed=3",
    ]


def test_the_jobs_api_names_say_what_they_are():
    assert job_api.jobs_api_url("ray://head:10001") == "http://head:8265"
    assert not hasattr(jobs, "resolve_address") and not hasattr(job_api, "resolve_address")
    assert job_api.SubmittedJobStatus.__module__ == "raybooth.cluster.job_api"
    assert not hasattr(job_api, "JobSummary") and not hasattr(jobs, "JobSummary")
