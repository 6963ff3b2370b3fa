"""Typed config for every raybooth job (one pydantic schema per job, shared sections, loading).

    raybooth train --config configs/dreambooth.yaml steps=20 concepts.0.class_name=cat tracking.experiment=dogs

    from raybooth.cluster.config import DreamBoothConfig, load_config
    cfg = load_config(DreamBoothConfig, "configs/dreambooth.yaml", ["steps=2"])

Each job reads one YAML under `configs/` into its schema, then applies `key.sub=value` overrides from the
command line. The modules: `base` (strict model, path marks, the `cluster`/`storage`/`tracking` sections),
`inference`, `dreambooth`, `serve` (each job's schema), `loading` (YAML, overrides, errors). Every name is
importable from here, so callers never need to know which module holds it.
"""

from raybooth.cluster.config.base import (
    PATH_KINDS,
    ClusterSection,
    DemoConfig,
    EngineOptions,
    JobConfig,
    SpeculativeSection,
    StorageSection,
    Strict,
    TrackingSection,
    field_path_kind,
    marked_paths,
    path_mark,
)
from raybooth.cluster.config.dreambooth import ConceptConfig, DreamBoothConfig, FleetConfig, FleetSubject
from raybooth.cluster.config.inference import BatchConfig, CaptionConfig, InferenceJobConfig
from raybooth.cluster.config.loading import (
    CONFIG_KINDS,
    build_config,
    config_data,
    config_kind_for,
    deep_merge,
    format_validation_error,
    load_any_config,
    load_config,
    parse_overrides,
    read_yaml,
)
from raybooth.cluster.config.serve import (
    AutoscalingSection,
    BatchingMixin,
    ChatServeSection,
    DeploymentSection,
    ImageServeSection,
    IngressSection,
    LimitsSection,
    SafetyCategory,
    SafetySection,
    ServeConfig,
)

__all__ = [
    "CONFIG_KINDS",
    "PATH_KINDS",
    "AutoscalingSection",
    "BatchConfig",
    "BatchingMixin",
    "CaptionConfig",
    "ChatServeSection",
    "ClusterSection",
    "ConceptConfig",
    "DemoConfig",
    "DeploymentSection",
    "DreamBoothConfig",
    "FleetConfig",
    "FleetSubject",
    "ImageServeSection",
    "InferenceJobConfig",
    "IngressSection",
    "EngineOptions",
    "JobConfig",
    "SpeculativeSection",
    "LimitsSection",
    "SafetyCategory",
    "SafetySection",
    "ServeConfig",
    "StorageSection",
    "Strict",
    "TrackingSection",
    "build_config",
    "config_data",
    "config_kind_for",
    "deep_merge",
    "field_path_kind",
    "format_validation_error",
    "load_any_config",
    "load_config",
    "marked_paths",
    "parse_overrides",
    "path_mark",
    "read_yaml",
]
