"""Sizing each stage's Ray resources from what the cluster has: an actor pool per model stage, the
CPUs of each task of a task stage.

Facts that shape this (Ray 2.60): an actor asking for `num_gpus` on a cluster without GPUs waits
forever, and actor pools that take every CPU leave none for the read tasks, so the run hangs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from operators.base import Stage
from vesl.annotate.config import AnnotateConfigBase, PoolConfig


@dataclass(frozen=True)
class Pool:
    size: int | None  # actors (a task stage: most tasks at once, None = Ray Data decides)
    num_cpus: float  # per actor (or task)
    num_gpus: float  # per actor (or task)
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor
    actor: bool = True


def wants_gpu(stage: type[Stage], config: AnnotateConfigBase) -> bool:
    """A GPU stage takes a GPU share unless its config pins it to the CPU (or switches it off)."""
    return stage.active(config.stage_config(stage)) and stage.wants_gpu(config.stage_config(stage))


def gpu_plan(names: list[str], gpus: float) -> dict[str, tuple[int, float]]:
    """{stage: (actors, GPUs per actor)} for the GPU stages NAMES. Fewer GPUs than stages: one actor
    each, sharing them evenly (one GPU, captioner and detector: 0.5 each). More: whole GPUs, split as
    evenly as they go, the earlier stages taking the remainder."""
    if not names or gpus <= 0:
        return {}
    if gpus < len(names):
        return {name: (1, gpus / len(names)) for name in names}
    whole = int(gpus)
    return {name: (whole // len(names) + (1 if k < whole % len(names) else 0), 1.0) for k, name in enumerate(names)}


def plan_pools(cpus: float, gpus: float, config: AnnotateConfigBase, use_gpu: bool = True) -> dict[str, Pool]:
    """One Pool per registered stage. Explicit settings in `ray.pools.<stage>` win; the rest is derived:

    - GPUs: shared by the GPU stages (`gpu_plan`), none when USE_GPU is false.
    - CPUs: a `ray.task_cpu_fraction` share (at least 1 CPU) stays free for read/decode/write tasks;
      the rest is split over the actor pools, fractional when there is less than one CPU each.
    - Task stages: the stage's own CPUs per task (decode: 1), Ray Data's concurrency.
    """
    chain = config.active_stages()
    actors = [s for s in chain if s.resources.actor]
    free_cpus = max(cpus - max(1.0, cpus * config.ray.task_cpu_fraction), 0.0)
    cpu_share = free_cpus / len(actors) if free_cpus > 0 else cpus / (len(actors) + 1)
    gpu_shares = gpu_plan([s.name for s in actors if wants_gpu(s, config)], gpus if use_gpu else 0.0)
    out = {}
    for stage in chain:
        pool: PoolConfig = getattr(config.ray.pools, stage.name)
        if not stage.resources.actor:
            out[stage.name] = Pool(size=pool.size, num_cpus=pool.num_cpus or stage.resources.num_cpus or 1.0,
                                   num_gpus=pool.num_gpus or 0.0, resources=dict(pool.resources), actor=False)
            continue
        size, per_gpu = gpu_shares.get(stage.name, (0, 0.0))
        num_gpus = pool.num_gpus if pool.num_gpus is not None else per_gpu
        if pool.size is not None:
            size = pool.size
        elif not size:
            size = max(1, math.floor(cpu_share)) if cpu_share >= 1 else 1
        num_cpus = pool.num_cpus if pool.num_cpus is not None else (
            1.0 if num_gpus > 0 else round(min(max(cpu_share / size, 0.05), max(cpu_share, 0.05)), 3))
        out[stage.name] = Pool(size=size, num_cpus=num_cpus, num_gpus=num_gpus, resources=dict(pool.resources))
    return out
