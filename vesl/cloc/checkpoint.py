"""A CLOC checkpoint is a self-contained directory:

    clip/                 the CLIP model (save_pretrained, safetensors), its tokenizer and image processor
    cloc.safetensors      the Prompter and the grounding head
    cloc.json             format version, Prompter config, pixel mean/std, step, the training config
    trainer_state.pt      optimiser, schedule, step/epoch and RNG states (only what resuming needs)
    metrics.jsonl         the metrics records up to this step

`vesl eval --checkpoint` takes one (or a training OUT, whose `model/` is the final checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vesl.cloc.model import ClocModel, PrompterConfig

FORMAT = "vesl-cloc"
FORMAT_VERSION = 1
CLIP_DIR, WEIGHTS, META, STATE, METRICS = "clip", "cloc.safetensors", "cloc.json", "trainer_state.pt", "metrics.jsonl"


def save_checkpoint(directory: str | Path, model: ClocModel, processor: Any, meta: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None, metrics: list[dict[str, Any]] | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.clip.save_pretrained(directory / CLIP_DIR, safe_serialization=True)
    processor.save_pretrained(directory / CLIP_DIR)
    heads = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("clip.")}
    save_file(heads, str(directory / WEIGHTS))
    record = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "prompter": model.prompter.config.model_dump(mode="json"),
              "pixel_mean": model.pixel_mean.flatten().tolist(), "pixel_std": model.pixel_std.flatten().tolist(),
              **meta}
    (directory / META).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    if trainer_state is not None:
        torch.save(trainer_state, directory / STATE)
    if metrics is not None:
        (directory / METRICS).write_text("".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a training OUT (its final `model/`)."""
    path = Path(path)
    if (path / META).exists():
        return path
    if (path / "model" / META).exists():
        return path / "model"
    raise FileNotFoundError(f"{path} is not a vesl CLOC checkpoint (no {META}) nor a training output with model/")


def fetch_checkpoint(uri: str, storage_options=None, cache_dir: str | None = None) -> Path:
    """A local checkpoint directory for URI: a local path as it is, a remote one (s3://...; a checkpoint
    or a training OUT) downloaded into a temporary folder."""
    import tempfile

    from vesl.core.storage import filesystem, join_uri

    if "://" not in uri or uri.startswith("file://"):
        return resolve_checkpoint(uri.removeprefix("file://"))
    fs, path = filesystem(uri, storage_options)
    for candidate in (path, join_uri(path, "model")):
        if fs.exists(join_uri(candidate, META)):
            local = Path(tempfile.mkdtemp(prefix="vesl-ckpt-", dir=cache_dir))
            fs.get(candidate.rstrip("/") + "/", str(local) + "/", recursive=True)
            return resolve_checkpoint(local)
    raise FileNotFoundError(f"{uri} is not a vesl CLOC checkpoint (no {META}) nor a training output with model/")


def read_meta(directory: str | Path) -> dict[str, Any]:
    meta = json.loads((Path(directory) / META).read_text())
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format')} v{meta.get('format_version')}, "
                         f"this vesl reads {FORMAT} v{FORMAT_VERSION}")
    return meta


def load_cloc(directory: str | Path, device: str = "cpu",
              attn_implementation: str | None = "sdpa") -> tuple[ClocModel, dict[str, Any]]:
    """(model, meta) from a checkpoint directory, weights through safetensors only."""
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from vesl.core.models import load_pretrained

    directory = resolve_checkpoint(directory)
    meta = read_meta(directory)
    clip = load_pretrained(CLIPModel, str(directory / CLIP_DIR), revision=None, trust_remote_code=False,
                           device="cpu", dtype=torch.float32, attn_implementation=attn_implementation)
    unrecorded = sorted(set(PrompterConfig.model_fields) - set(meta["prompter"]))
    if unrecorded:  # written before these settings existed: what it was trained with is not known for sure
        raise ValueError(f"{directory}: a checkpoint of an earlier vesl, whose Prompter settings do not record "
                         f"{unrecorded}; this vesl does not guess them: train it again")
    model = ClocModel(clip, PrompterConfig.model_validate(meta["prompter"]), tuple(meta["pixel_mean"]),
                      tuple(meta["pixel_std"]))
    missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=False)
    missing = [k for k in missing if not k.startswith("clip.")]
    if missing or unexpected:
        raise ValueError(f"{directory}: Prompter weights do not match (missing {missing}, unexpected {unexpected})")
    meta["path"] = str(directory)
    return model.to(device).eval(), meta


def load_trainer_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / STATE
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def load_metrics(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
