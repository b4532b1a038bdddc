"""The CLOC trainer's configuration: model, data, loss, optimiser, run. Sources as for annotate:
defaults (a real run: CLIP ViT-B/16 from the hub) < `--preset tiny` < `--config FILE` < `--set k=v`."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field

from vesl.cloc.data import DataConfig
from vesl.cloc.loss import LossConfig
from vesl.cloc.model import PrompterConfig
from vesl.core.settings import Settings
from vesl.core.storage import StorageConfig


class ModelConfig(Settings):
    clip: str = Field(default="openai/clip-vit-base-patch16", description="CLIPModel hub id or local path "
                      "(its tokenizer and image processor come from the same place).")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(default=False, description="Allow a model repo's own code to run.")
    prompter: PrompterConfig = PrompterConfig()


class OptimConfig(Settings):
    batch_size: int = Field(default=256, ge=2, description="Images per worker per step (the global batch is this "
                            "times the number of workers; region negatives span the global batch).")
    epochs: int = Field(default=10, ge=1, description="Passes over the shards.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many steps (None: epochs decide).")
    max_minutes: float | None = Field(default=None, gt=0, description="Stop (and checkpoint) after this much "
                                      "training time; the schedule still spans max_steps/epochs.")
    lr: float = Field(default=5e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay (not on biases, norms, "
                                "embeddings, the temperature).")
    betas: tuple[float, float] = Field(default=(0.9, 0.98), description="AdamW betas (CLIP's).")
    warmup_steps: int = Field(default=200, ge=0, description="Linear warm-up steps.")
    schedule: Literal["cosine", "constant"] = Field(default="cosine", description="After warm-up: cosine decay to "
                                                    "zero at the last step, or constant.")
    grad_clip: float | None = Field(default=1.0, gt=0, description="Clip the gradient norm (None: off).")


class RunConfig(Settings):
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (DDP ranks).")
    use_gpu: bool | None = Field(default=None, description="One GPU per worker; None: when the cluster has GPUs.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs reserved per training worker.")
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads per worker (None: "
                                      "cpus_per_worker rounded up).")
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="'auto': bf16 autocast on a "
                                                       "GPU, fp32 on a CPU.")
    seed: int = Field(default=0, description="Seeds the Prompter's initialisation and region sampling.")
    log_every_steps: int = Field(default=20, ge=1, description="Progress line and metrics.jsonl record interval.")
    checkpoint_every_steps: int = Field(default=500, ge=1, description="Checkpoint interval (and at the end).")
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints kept under OUT/run.")
    max_failures: int = Field(default=0, ge=-1, description="Ray Train restarts from the last checkpoint after "
                              "a worker failure (-1: no limit).")


class TrainConfig(Settings):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()

    def training_hash(self) -> str:
        """What must match for a run to resume: the model, data, loss and optimiser settings (not the
        run section's resources or intervals, not epochs/max_steps/max_minutes, which a resumed run may extend,
        not where the images are read from or how many may fail)."""
        data = self.model_dump(mode="json", include={"model", "data", "loss", "optim"})
        for key in ("epochs", "max_steps", "max_minutes"):
            data["optim"].pop(key, None)
        for key in ("materialize", "prep_batch_rows", "relocate", "max_unreadable_share", "probe_images"):
            data["data"].pop(key, None)  # how and where the same data is read, not what it is
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def public_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def train_preset(name: str) -> dict[str, Any]:
    """'tiny': the tiny from-scratch CLIP built offline, sized for a 2-core CPU."""
    if name != "tiny":
        raise ValueError(f"unknown preset {name!r}; known: tiny")
    from vesl.fixtures.tiny import build_tiny_models, tiny_models_dir

    clip = build_tiny_models(tiny_models_dir())["clip"]
    return {
        "model": {"clip": str(clip)},
        "data": {"materialize": True, "shuffle_buffer_rows": 512},
        # from scratch, every text embedding starts nearly parallel: mask by cosine once they have spread
        "loss": {"cosine_mask_from_step": 500},
        "optim": {"batch_size": 64, "epochs": 40, "lr": 2e-3, "warmup_steps": 100, "weight_decay": 0.05},
        "run": {"log_every_steps": 25, "checkpoint_every_steps": 250},
    }


def load_train_config(path: str | None = None, preset_name: str | None = None,
                      overrides: list[str] | None = None) -> TrainConfig:
    from vesl.core.settings import merge_sources

    return TrainConfig.model_validate(
        merge_sources(train_preset(preset_name) if preset_name else None, path, overrides))
