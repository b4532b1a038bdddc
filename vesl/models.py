"""Loading Hugging Face models the one way every stage does it: safetensors only, remote code off
unless the config turns it on, the same `from_pretrained` call for a hub id and a local path."""

from __future__ import annotations

from typing import Any


def load_pretrained(model_cls: Any, model_id: str, *, revision: str | None, trust_remote_code: bool,
                    device: str, dtype: Any, attn_implementation: str | None = None) -> Any:
    kwargs: dict[str, Any] = dict(
        revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True, dtype=dtype
    )
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = model_cls.from_pretrained(model_id, **kwargs)
    return model.to(device).eval()


def load_processor(model_id: str, *, revision: str | None, trust_remote_code: bool, **kwargs: Any) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code, **kwargs)


def provenance(model: Any, model_id: str, revision: str | None) -> dict[str, str]:
    """Which weights made the labels: id, the resolved commit when the hub gave one, the class."""
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return {"id": model_id, "revision": commit or revision or "local", "class": type(model).__name__}
