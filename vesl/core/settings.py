"""The base of every config model: frozen, unknown keys refused (a typo in a YAML key is an error)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    """A config section. Frozen (a config cannot change under a running job) and strict about keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())
