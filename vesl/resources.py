"""Sizing the model actor pools from what the cluster has.

Facts that shape this (Ray 2.60): an actor asking for `num_gpus` on a cluster without GPUs waits
forever, and actor pools that take every CPU leave none for the read tasks, so the run hangs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vesl.config import PoolConfig, RayConfig

MODEL_STAGES = ("caption", "phrase", "detect")
GPU_STAGES = ("caption", "detect")


@dataclass(frozen=True)
class Pool:
    size: int  # actors
    num_cpus: float  # per actor
    num_gpus: float  # per actor
    torch_threads: int  # intra-op threads per actor
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor


def plan_pools(cpus: float, gpus: float, config: RayConfig, use_gpu: bool = True) -> dict[str, Pool]:
    """One Pool per model stage. Explicit settings in CONFIG win; the rest is derived:

    - GPUs: with one GPU the captioner and detector share it (0.5 each); with more, each takes
      whole GPUs, the detector half (rounded down, at least one) and the captioner the rest.
    - CPUs: a `task_cpu_fraction` share (at least 1 CPU) stays free for read/decode/write tasks;
      the rest is split over the three pools, fractional when there is less than one CPU each.
    """
    pools: dict[str, PoolConfig] = {
        "caption": config.caption_pool, "phrase": config.phrase_pool, "detect": config.detect_pool}
    gpus = gpus if use_gpu else 0.0
    free_cpus = max(cpus - max(1.0, cpus * config.task_cpu_fraction), 0.0)
    cpu_share = free_cpus / len(MODEL_STAGES) if free_cpus > 0 else cpus / (len(MODEL_STAGES) + 1)
    gpu_plan: dict[str, tuple[int, float]] = {}
    if gpus >= 2:
        detect_gpus = max(1, int(gpus) // 2)
        gpu_plan = {"detect": (detect_gpus, 1.0), "caption": (max(1, int(gpus) - detect_gpus), 1.0)}
    elif gpus > 0:
        gpu_plan = {"detect": (1, gpus / 2), "caption": (1, gpus / 2)}
    out = {}
    for stage, pool in pools.items():
        size, per_gpu = gpu_plan.get(stage, (0, 0.0))
        num_gpus = pool.num_gpus if pool.num_gpus is not None else per_gpu
        if pool.size is not None:
            size = pool.size
        elif not size:
            size = max(1, math.floor(cpu_share)) if cpu_share >= 1 else 1
        num_cpus = pool.num_cpus if pool.num_cpus is not None else (
            1.0 if num_gpus > 0 else round(min(max(cpu_share / size, 0.05), max(cpu_share, 0.05)), 3))
        out[stage] = Pool(size=size, num_cpus=num_cpus, num_gpus=num_gpus, torch_threads=max(1, int(num_cpus)),
                          resources=dict(pool.resources))
    return out
