"""The base of every config model (frozen, unknown keys refused: a typo in a YAML key is an error), and how
a job's config is assembled: preset < YAML file < `--set section.key=value` overrides."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    """A config section. Frozen (a config cannot change under a running job) and strict about keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """'detect.threshold=0.2' -> {'detect': {'threshold': 0.2}} (the value is read as YAML)."""
    if "=" not in text:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw else ""
    for key in reversed(dotted.strip().split(".")):
        value = {key: value}
    return value


def add_config_arguments(p, example: str, presets: list[str], preset_help: str) -> None:
    """The --config / --preset / --set options every job takes."""
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--preset", choices=presets, help=preset_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override one config value, e.g. --set {example} (repeatable)")


def merge_sources(preset_data: dict[str, Any] | None, path: str | None,
                  overrides: list[str] | None) -> dict[str, Any]:
    """Preset < YAML file < --set overrides, as one nested dict (the job's model validates it)."""
    data: dict[str, Any] = dict(preset_data or {})
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config {path} must be a YAML mapping")
        data = deep_merge(data, loaded)
    for item in overrides or []:
        data = deep_merge(data, parse_override(item))
    return data
