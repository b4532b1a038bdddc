"""The annotate job on Ray Data: work units in, the registered stages in order, staged parts out, and on
the driver a commit task per finished unit. Wiring only: the stages hold the model logic."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from operators.base import run_stage_task
from operators.registry import drops_after
from vesl.annotate.config import AnnotateConfigBase
from vesl.annotate.output.lease import Lease, LeaseLostError
from vesl.annotate.output.ledger import add_stage_figures, empty_stage_figures
from vesl.annotate.output.writer import UnitAccountingError, commit_unit, stage_unit_parts
from vesl.annotate.pools import Pool, plan_pools
from vesl.annotate.units import Plan, read_units
from vesl.core.outdir import OutputDir

log = logging.getLogger("vesl.annotate.pipeline")


@dataclass
class Committed:
    """What this run committed: sums over its units' completion records, and the units that failed."""

    inputs: int = 0
    rows: int = 0
    rejects: int = 0
    regions: int = 0
    units: int = 0
    failed_units: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record: Mapping[str, Any]) -> None:
        for key in ("inputs", "rows", "rejects", "regions"):
            setattr(self, key, getattr(self, key) + record[key])
        self.units += 1

    def fail(self, unit: int, error: str) -> None:
        self.failed_units.append({"unit": unit, "error": error})


def build(ds, config: AnnotateConfigBase, storage_options: dict, use_gpu: bool):
    """Chain the registered stages onto DS (a Dataset of input rows): an actor pool per model stage,
    Ray Data tasks for the others, each dropping the columns no later stage reads."""
    import ray

    resources = ray.cluster_resources()
    pools = plan_pools(resources.get("CPU", 1.0), resources.get("GPU", 0.0), config, use_gpu=use_gpu)
    log.info("stage resources: %s", {k: vars(v) for k, v in pools.items()})
    drops = drops_after(config.active_stages())
    for stage in config.active_stages():
        cfg, pool = config.stage_config(stage), pools[stage.name]
        kwargs: dict[str, Any] = dict(batch_format="pyarrow", udf_modifying_row_count=False, num_cpus=pool.num_cpus)
        if pool.num_gpus > 0:
            kwargs["num_gpus"] = pool.num_gpus
        if pool.resources:
            kwargs["resources"] = dict(pool.resources)
        # whole_blocks: one block per call (the stage's batch_size is its own inner batch)
        batch_size = config.input.block_rows if stage.resources.whole_blocks else cfg.batch_size
        context = {"config": cfg, "storage_options": storage_options, "drop": drops[stage.name]}
        if stage.resources.actor:
            ds = ds.map_batches(stage, fn_constructor_kwargs=context, batch_size=batch_size,
                                compute=ray.data.ActorPoolStrategy(size=pool.size), **kwargs)
        else:
            ds = ds.map_batches(stage_task(stage), fn_kwargs={"stage": stage, **context}, batch_size=batch_size,
                                concurrency=pool.size, **kwargs)
    return ds, pools


def stage_task(stage):
    """`run_stage_task` under STAGE's class name, which Ray Data shows for the step (`MapBatches(DecodeImages)`,
    as for the actor stages), in its progress and in its no-progress error."""
    def task(batch, **kwargs):
        return run_stage_task(batch, **kwargs)

    task.__name__ = task.__qualname__ = stage.__name__
    return task


def run_units(todo, plan: Plan, out: OutputDir, config: AnnotateConfigBase, footer: dict[str, str], lease: Lease,
              committed: Committed) -> dict[str, Pool]:
    """Read, annotate and commit the units TODO (a table of plan rows) on Ray Data; returns the stage pools."""
    import ray
    from ray.data.exceptions import ExecutionTimeoutError

    storage_options = config.storage.options()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0  # each GPU stage's device setting is checked per stage
    units = ray.data.from_arrow(unit_blocks(todo))
    inputs = units.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=config.ray.read_num_cpus,
                               fn_kwargs={"kind": plan.meta["kind"], "config": config.input,
                                          "storage_options": storage_options})
    inputs = inputs.repartition(target_num_rows_per_block=config.input.block_rows)  # streaming split, no shuffle
    ds, pools = build(inputs, config, storage_options, use_gpu)
    staged_parts = ds.map_batches(stage_unit_parts, batch_size=config.output.rows_per_part,
                                  batch_format="pyarrow", num_cpus=config.ray.read_num_cpus,
                                  fn_kwargs={"out": out, "footer": footer})
    committer = UnitCommitter(todo, out, footer, config.output.compression, lease, committed)
    try:
        committer.drive(staged_parts)
    except ExecutionTimeoutError as e:
        raise NoProgressError(no_progress(e, config.ray.no_progress_timeout_s, committer)) from None
    return pools


MAX_UNIT_BLOCKS = 1024  # reading tasks the units are spread over (one block each): a few per CPU of a big cluster


def unit_blocks(todo: pa.Table) -> list[pa.Table]:
    """TODO (a table of units) cut into up to MAX_UNIT_BLOCKS contiguous tables, each a block of its own, so
    reading spreads over tasks without a repartition (an all-to-all step, which turns Ray Data's no-progress
    watchdog off)."""
    cuts = np.linspace(0, todo.num_rows, min(todo.num_rows, MAX_UNIT_BLOCKS) + 1).astype(int)
    return [todo.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])] or [todo]


class NoProgressError(RuntimeError):
    """Nothing moved through the pipeline for ray.no_progress_timeout_s (a read or a model that hangs)."""


def no_progress(error: Exception, timeout_s: float, committer: "UnitCommitter") -> str:
    """One line for Ray Data's no-progress timeout: which steps had tasks running, and which units were open."""
    running = [line.strip(" -") for line in str(error).splitlines()
               if line.startswith("  - ") and ": 0 active task" not in line]
    open_units = sorted(set(committer.expected) - committer.settled)
    return (f"no progress for {timeout_s:.0f} s (ray.no_progress_timeout_s): nothing moved through the pipeline. "
            f"Still running: {'; '.join(running) or 'nothing'}. Units not committed: {len(open_units)} (e.g. "
            f"{open_units[:5]}); a task blocked in a read or a model call is the usual cause. Committed units stay: "
            "fix the cause and re-run to resume")


class UnitCommitter:
    """Drives the pipeline from the driver: its last step reports, per batch and unit, the inputs staged,
    the parts written and each stage's rows and seconds. A unit whose staged inputs reach its planned
    count is committed by a Ray task (shard, rejects file, completion record). The driver holds only the
    units in flight."""

    def __init__(self, todo, out: OutputDir, footer: dict[str, str], compression: str, lease: Lease,
                 committed: Committed) -> None:
        import ray

        self.out, self.footer, self.compression, self.lease, self.committed = out, footer, compression, lease, committed
        self.expected = dict(zip(todo.column("unit").to_pylist(), todo.column("count").to_pylist()))
        self.keys = dict(zip(todo.column("unit").to_pylist(), todo.column("key").to_pylist()))
        self.commit = ray.remote(num_cpus=0.25, max_retries=2)(commit_unit)
        self.in_flight: dict[int, dict[str, Any]] = {}  # unit -> staged inputs, parts and stage figures so far
        self.running: dict[Any, int] = {}  # commit task -> unit
        self.settled: set[int] = set()

    def drive(self, staged_parts) -> None:
        batches = iter(staged_parts.iter_batches(batch_format="pyarrow", batch_size=None))
        try:
            for batch in batches:
                for row in batch.to_pylist():
                    self.add(row)
                self.settle(block=False)
                if self.lease.lost:
                    raise LeaseLostError(self.lease.lost)
        finally:  # a failure here (a commit task's, a lost lease) shuts the pipeline and its actors down now,
            batches.close()  # not whenever the suspended iterator is collected: a run after it gets the CPUs
        for unit in list(self.in_flight):  # fewer inputs than planned came through: refused, with its counts
            self.start(unit)
        self.settle(block=True)
        for unit in sorted(set(self.expected) - self.settled):
            self.committed.fail(unit, f"unit {unit}: no input of it reached the writer")

    def add(self, row: Mapping[str, Any]) -> None:
        unit = row["unit"]
        state = self.in_flight.setdefault(unit, {"inputs": 0, "parts": [], "stages": {}})
        state["inputs"] += row["inputs"]
        state["parts"] += row["parts"]
        for name, rows, seconds, metrics in zip(row["stage"], row["stage_rows"], row["stage_seconds"],
                                                row["stage_metrics"]):
            add_stage_figures(state["stages"].setdefault(name, empty_stage_figures()),
                              {"rows": rows, "seconds": seconds, "metrics": json.loads(metrics)})
        if state["inputs"] >= self.expected[unit]:
            self.start(unit)  # more than planned: commit_unit refuses it

    def start(self, unit: int) -> None:
        state = self.in_flight.pop(unit)
        ref = self.commit.remote(self.out, unit, self.expected[unit], state["parts"], self.footer, self.compression,
                                 self.lease.fence(), self.lease.run_id, state["stages"], self.keys[unit])
        self.running[ref] = unit

    def settle(self, block: bool) -> None:
        import ray

        while self.running:
            refs = list(self.running)
            ready, _ = ray.wait(refs, num_returns=len(refs) if block else 1, timeout=None if block else 0)
            if not ready:
                return
            for ref in ready:
                unit = self.running.pop(ref)
                self.settled.add(unit)
                try:
                    record = ray.get(ref)
                except UnitAccountingError as e:
                    self.committed.fail(unit, str(e))
                    log.error("%s", e)
                    continue
                self.committed.add(record)
