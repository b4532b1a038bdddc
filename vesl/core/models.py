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


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when present; anything else is passed to torch as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str):
    """'auto' is bfloat16 on CUDA and float32 elsewhere (CPU bf16 matmuls are slow here)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def describe_pretrained(model_id: str, revision: str | None, trust_remote_code: bool) -> dict[str, str]:
    """Which weights make the labels (id, the resolved commit when the hub gives one, the class), read
    from the model's config without loading its weights."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    return {"id": model_id, "revision": getattr(hf, "_commit_hash", None) or revision or "local",
            "class": (hf.architectures or [type(hf).__name__])[0]}
