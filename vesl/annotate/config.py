"""The annotate job's configuration: one pydantic model composed of each stage's own config.

The sections: input, storage, one per registered stage (operators.registry, in order), output, ray
(with `ray.pools.<stage>` per stage). The model is built from the registry, so a new stage's config
is a section with no edit here.

Sources, later ones winning: defaults (real models, real thresholds) < preset (`--preset tiny`) <
YAML file (`--config`) < `--set section.key=value` overrides.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, create_model, field_validator, model_validator

from operators.base import Stage
from operators.registry import stages
from vesl.annotate.sources.config import InputConfig
from vesl.core.settings import Settings, merge_sources
from vesl.core.storage import StorageConfig

PARQUET_CODECS = ("snappy", "gzip", "brotli", "zstd", "lz4")  # what pyarrow's Parquet writer names


class PoolConfig(Settings):
    size: int | None = Field(default=None, ge=1, description="Actors in the pool (a task stage: at most this many "
                             "tasks at once); None sizes it from the cluster.")
    num_cpus: float | None = Field(default=None, gt=0, description="CPUs per actor (or task); None sizes it from "
                                   "the cluster (a task stage: the stage's own default).")
    num_gpus: float | None = Field(
        default=None, ge=0,
        description="GPUs per actor; None: a share of the cluster's GPUs when it has any, else 0.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per actor, e.g. {detector_node: 1}: the pool's actors then run only on "
        "nodes that advertise them (`ray start --resources`, or rayStartParams in a KubeRay worker group).",
    )


class RayConfig(Settings):
    no_progress_timeout_s: float = Field(
        default=900.0, gt=0, description="Fail the run with a message if no batch finishes for this long."
    )
    task_cpu_fraction: float = Field(
        default=0.25, gt=0, lt=1,
        description="Share of the cluster's CPUs left to read/decode/write tasks when sizing the model pools "
        "(at least one CPU): an actor pool that takes every CPU starves the readers and hangs.",
    )
    read_num_cpus: float = Field(
        default=0.25, gt=0,
        description="CPUs reserved by an input-reading task. One such task streams a whole manifest file and "
        "lives as long as the run, mostly waiting on backpressure: a whole CPU for it would idle the decoders.",
    )
    object_store_budget_mb: float | None = Field(
        default=1024, gt=0,
        description="Cap on the object-store memory the job's blocks in flight may take (Ray Data's "
        "resource_limits.object_store_memory). Decoded images queue between stages; without a cap the queue "
        "grows toward Ray Data's default (half the object store), so peak memory would depend on how long the "
        "run is. None: Ray Data's default.",
    )


class OutputConfig(Settings):
    on_existing: Literal["resume", "error", "overwrite"] = Field(
        default="resume",
        description="When OUTPUT already holds files: 'resume' the vesl run there (same input and label config, "
        "else refuse), refuse ('error'), or delete them first ('overwrite').",
    )
    rows_per_part: int = Field(default=2000, ge=1, description="Rows per staged part: finished rows are written "
                               "to OUTPUT/_vesl/staging/ in batches of at most this many, and a work unit's parts "
                               "become its one shard when the unit is committed (a shard is one unit).")
    lease_wait_s: float = Field(default=0.0, ge=0, description="When another run holds OUTPUT's lease, wait up to "
                                "this long for it to finish or to go silent (taken over after lease_ttl_s without a "
                                "heartbeat) instead of stopping at once with exit 2. Retried cluster jobs (KubeRay's "
                                "backoffLimit) want a few minutes: the old driver may still be dying.")
    lease_ttl_s: float = Field(default=120.0, ge=1, description="A run whose lease shows no heartbeat for this long "
                               "is taken for dead and its lease taken over by the next run (which then redoes its "
                               "units in flight; the dead run, should it wake, stops with exit 7). It beats every "
                               "15 s (or a quarter of this, if less). Generous by default: for clock skew, slow "
                               "stores and paused processes.")
    compression: str = Field(default="zstd", description="Parquet compression codec: zstd, snappy, gzip, brotli, "
                             "lz4 or none (checked against this pyarrow before the run starts).")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "rows_per_shard" in data:
            raise ValueError("output.rows_per_shard is now output.rows_per_part (rows per staged part; a shard is one "
                             "work unit, sized by input.unit_rows)")
        return data

    @field_validator("compression")
    @classmethod
    def _codec_exists(cls, value: str) -> str:
        import pyarrow as pa

        if value.lower() != "none" and not (value.lower() in PARQUET_CODECS and pa.Codec.is_available(value.lower())):
            raise ValueError(f"unknown or unavailable Parquet compression {value!r}; use one of "
                             f"{sorted(c for c in PARQUET_CODECS if pa.Codec.is_available(c))} or none")
        return value.lower()


class ServeConfig(Settings):
    """`vesl serve`: the online service's HTTP front, its limits and its deployments (not label settings)."""

    host: str = Field(default="127.0.0.1", description="Address the HTTP proxy listens on (0.0.0.0: every "
                      "interface, as in a cluster).")
    port: int = Field(default=8000, ge=1, le=65535)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    max_images: int = Field(default=16, ge=1, description="Images per request; more get 413.")
    max_alt_text_chars: int = Field(default=100_000, ge=1, description="A longer alt_text gets 413 (the stages "
                                    "read its first characters only, as in the batch job).")
    request_timeout_s: float = Field(default=120.0, gt=0, description="The HTTP proxy answers a request that takes "
                                     "longer with a timeout status.")
    max_ongoing_requests: int = Field(default=8, ge=1, description="Requests one ingress replica works on at once.")
    max_queued_requests: int = Field(default=32, ge=1, description="Requests waiting for an ingress replica; "
                                     "beyond them a request gets 503 with Retry-After at once (no queue is "
                                     "unbounded).")
    stage_max_queued_requests: int = Field(default=128, ge=1, description="Rows waiting for a model stage's "
                                           "replicas; beyond them the request gets 503 with Retry-After.")
    retry_after_s: float = Field(default=1.0, ge=0, description="The Retry-After of a 503.")
    batch_wait_ms: float = Field(default=10.0, ge=0, description="How long a model stage waits to fill a batch "
                                 "(its batch_size) with concurrent requests' rows.")
    ingress_replicas: int = Field(default=1, ge=1)
    replicas: dict[str, int] = Field(default_factory=dict, description="Replicas per model stage, e.g. "
                                     "{detect: 2}; a stage not named gets its pool size (ray.pools.<stage>).")
    autoscaling: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Ray Serve autoscaling_config per stage (or 'ingress'), e.g. "
        "{detect: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}}; it replaces replicas.")
    url_schemes: list[str] = Field(default_factory=lambda: ["http", "https"], description="Schemes an image_url "
                                   "may have (never file:// or a bare path unless listed: 'file').")
    allow_internal_addresses: bool = Field(
        default=False, description="Fetch image_urls whose host is loopback, link-local, private or otherwise "
        "not public. Off: the service is no proxy into the cluster.")


class AnnotateConfigBase(Settings):
    """Base of the annotate config; `annotate_config_class` adds one section per registered stage."""

    input: InputConfig = InputConfig()
    storage: StorageConfig = StorageConfig()

    @classmethod
    def stage_classes(cls) -> tuple[type[Stage], ...]:
        return getattr(cls, "_stages", ())

    def active_stages(self) -> tuple[type[Stage], ...]:
        """The registered stages this config runs (a stage its section switches off is left out)."""
        return tuple(s for s in self.stage_classes() if s.active(self.stage_config(s)))

    def stage_config(self, stage: type[Stage]) -> Settings:
        return getattr(self, stage.name)

    def label_hash(self) -> str:
        """Hash of everything that changes the labels (not paths, credentials, resources or speed)."""
        label = {"input": self.input.model_dump(mode="json")}
        for key in ("limit", "block_rows", "allow_empty", "unit_rows", "slice"):  # how much and how fast, not what
            label["input"].pop(key, None)
        for stage in self.stage_classes():
            stage_config = self.stage_config(stage)
            section = stage_config.model_dump(mode="json")
            for key in stage.speed_settings:  # how fast, not what: these may change on resume
                section.pop(key, None)
            for key in getattr(stage_config, "label_exclude", tuple)():  # settings the config does not use
                section.pop(key, None)
            label[stage.name] = section
        return hashlib.sha256(json.dumps(label, sort_keys=True).encode()).hexdigest()[:16]

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data with secrets masked (SecretStr dumps as '**********')."""
        return json.loads(self.model_dump_json())

    def __reduce__(self):
        # The model class is made for its stage chain (`annotate_config_class`); pickled by name it would come back
        # on a Ray worker as the import-time registry's class, with other stages. It travels as its chain instead.
        return _config_of_chain, (self.stage_classes(),), self.__getstate__()


@functools.lru_cache(maxsize=8)
def annotate_config_class(chain: tuple[type[Stage], ...]) -> type[AnnotateConfigBase]:
    """The annotate config model for the stages CHAIN: a section per stage, and a pool per stage."""
    pools = create_model("PoolsConfig", __base__=Settings,
                         **{stage.name: (PoolConfig, PoolConfig()) for stage in chain})
    ray = create_model("RayConfig", __base__=RayConfig, pools=(pools, Field(
        default=pools(), description="Per stage: its actor pool (a task stage: its tasks), e.g. ray.pools.caption")))
    model = create_model("AnnotateConfig", __base__=AnnotateConfigBase,
                         **{stage.name: (stage.config_class, stage.config_class()) for stage in chain},
                         output=(OutputConfig, OutputConfig()), ray=(ray, ray()), serve=(ServeConfig, ServeConfig()))
    model._stages = chain
    return model


def _config_of_chain(chain: tuple[type[Stage], ...]) -> AnnotateConfigBase:
    """An empty instance of the config model of CHAIN, for unpickling (its state is set next)."""
    model = annotate_config_class(chain)
    return model.__new__(model)


# The config of the stages registered at import; `load_config` builds it for the registry as it is then.
AnnotateConfig = annotate_config_class(stages())


PRESETS_DIR = Path(__file__).parent / "presets"
PRESET_HELP = ("paper: the paper's recipe (the defaults); fast: BLIP-large, no fusion; alt-ngram: alt-text phrases "
               "only, no captioner (the ablation); tiny: offline tiny random-weight models (demo and tests)")


def preset_names() -> list[str]:
    """The annotate presets shipped with vesl (vesl/annotate/presets/NAME.yaml)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset(name: str) -> dict[str, Any]:
    """The preset NAME as config data; '{tiny}' in a value is the tiny models' folder (built if needed)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    text = path.read_text()
    if "{tiny}" in text:
        from vesl.fixtures.tiny import build_tiny_models, tiny_models_dir

        root = tiny_models_dir()
        build_tiny_models(root)
        text = text.replace("{tiny}", str(root))
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"preset {path} must be a YAML mapping")
    return data


def load_config(path: str | None = None, preset_name: str | None = None,
                overrides: list[str] | None = None) -> AnnotateConfigBase:
    """Defaults < preset < YAML file < --set overrides, validated for the registered stages."""
    data = merge_sources(preset(preset_name) if preset_name else None, path, overrides)
    return annotate_config_class(stages()).model_validate(data)
