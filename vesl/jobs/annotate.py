"""The annotate job: inputs -> the registered stages (decode, caption, phrases, detect) -> region-text
shards.

Wires stages and I/O on Ray Data; holds no model logic. Run it as
    python pipelines/annotate.py INPUT OUTPUT [--config FILE.yaml] [--preset tiny] [--set k=v ...]
or `vesl annotate ...`, or under `ray job submit --working-dir . -- python pipelines/annotate.py ...`
(inside a Ray job RAY_ADDRESS is set and the job joins that cluster; otherwise it starts a local one).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from typing import Any

from operators.base import run_stage_task
from operators.registry import check_chain, drops_after, funnel_steps
from schemas.region_text import (
    META_CONFIG_HASH,
    META_MODELS,
    META_SCHEMA_VERSION,
    META_THRESHOLDS,
    META_VERSION,
    SCHEMA_VERSION,
)
from vesl import __version__
from vesl.config import AnnotateConfigBase, add_config_arguments, load_config
from vesl.core.ray import init_ray, stop_ray
from vesl.core.storage import resolve_output
from vesl.errors import EXIT_ACCOUNTING, EXIT_OK, Terminated, classify, install_stop_handlers
from vesl.inputs import EmptyInputError, plan_input
from vesl.lease import Lease, LeaseHeldError, LeaseLostError
from vesl.resources import plan_pools
from vesl.runstate import (
    OutputConflictError,
    account,
    check_output_target,
    clean_staging,
    drop_empty_staging,
    funnel,
    move_strays,
    prepare_output,
    read_ledger,
    take_lease,
)
from vesl.units import (
    Plan,
    PlanMismatchError,
    Slice,
    check_plan,
    load_plan,
    make_plan,
    read_units,
    save_plan,
    todo_units,
)
from vesl.writer import MANIFEST, UnitAccountingError, commit_unit, stage_unit_parts, write_manifest

log = logging.getLogger("vesl.jobs.annotate")


def footer_metadata(config: AnnotateConfigBase, models: dict[str, Any]) -> dict[str, str]:
    thresholds: dict[str, Any] = {}
    for stage in config.active_stages():
        thresholds.update(stage.thresholds(config.stage_config(stage)))
    return {
        META_SCHEMA_VERSION: SCHEMA_VERSION,
        META_VERSION: __version__,
        META_MODELS: json.dumps(models, sort_keys=True),
        META_THRESHOLDS: json.dumps(thresholds, sort_keys=True),
        META_CONFIG_HASH: config.label_hash(),
    }


def model_provenance(config: AnnotateConfigBase) -> dict[str, Any]:
    """What the footer records about the models, read from their configs without loading weights."""
    out: dict[str, Any] = {}
    for stage in config.active_stages():
        out.update(stage.describe_models(config.stage_config(stage)))
    return out


def model_provenance_on_ray(config: AnnotateConfigBase) -> dict[str, Any]:
    """`model_provenance` in a Ray task: reading a model's config imports torch and transformers, about
    200 MB the driver of a long job need not hold. Its error is raised here as itself."""
    import ray

    try:
        return ray.get(ray.remote(num_cpus=0.1, max_retries=0)(model_provenance).remote(config))
    except ray.exceptions.RayTaskError as e:
        raise (e.cause if isinstance(e.cause, BaseException) else e) from None


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
            ds = ds.map_batches(run_stage_task, fn_kwargs={"stage": stage, **context}, batch_size=batch_size,
                                concurrency=pool.size, **kwargs)
    return ds, pools


def run_annotate(input_uri: str, output_uri: str, config: AnnotateConfigBase) -> dict[str, Any]:
    """Run the whole job (or slice `input.slice` of it), or finish a killed one; returns the run
    manifest (also OUTPUT/manifest.json)."""
    import ray

    started = time.perf_counter()
    check_chain(config.active_stages())  # a config that switches a needed stage off is refused here
    storage_options = config.storage.options()
    part = Slice.parse(config.input.slice)
    init_ray()
    install_stop_handlers()  # after ray.init, which sets a SIGTERM handler of its own
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = config.ray.no_progress_timeout_s
    ctx.raise_original_map_exception = True  # a full disk stays an OSError through iter_batches (its exit code)
    if config.ray.object_store_budget_mb:
        limits = ctx.execution_options.resource_limits
        budget = config.ray.object_store_budget_mb * 2**20
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    # Everything that can refuse the job (OUTPUT's bucket, models, input) is checked before OUTPUT is touched.
    check_output_target(output_uri, storage_options)
    models = model_provenance_on_ray(config)
    # a resume (or another slice) reuses the saved plan; --overwrite plans afresh
    plan = None if config.output.on_existing == "overwrite" else load_plan(output_uri, storage_options)
    fresh_plan, planning_s = plan is None, 0.0
    if fresh_plan:
        planning = time.perf_counter()
        input_plan = plan_input(input_uri, config.input, storage_options)
        log.info("input %s: %s, %d source(s); it holds %s", input_uri, input_plan.label, len(input_plan.units),
                 input_plan.holds())
        plan = make_plan(input_uri, input_plan, config.input, storage_options, num_cpus=config.ray.read_num_cpus)
        planning_s = time.perf_counter() - planning
        if plan.inputs == 0 and not config.input.allow_empty:
            raise EmptyInputError(f"input {input_uri} yields no inputs: read as {input_plan.label}, its "
                                  f"{len(input_plan.units)} source(s) hold no rows; it holds {input_plan.holds()}. "
                                  "Set input.allow_empty=true to accept an empty input")
    lease = take_lease(output_uri, storage_options, wait_s=config.output.lease_wait_s, part=part)
    try:
        mode = prepare_output(output_uri, input_uri, config.label_hash(), config.output.on_existing, storage_options,
                              part)
        check_plan(plan, input_uri, config.input)
        if fresh_plan or mode == "fresh":
            save_plan(output_uri, storage_options, plan)
    except BaseException:
        lease.discard()  # refused: OUTPUT is left as it was found
        raise
    try:
        return run_holding_lease(input_uri, output_uri, config, lease, mode, plan, part, models, started, planning_s)
    finally:
        lease.release()


def run_holding_lease(input_uri: str, output_uri: str, config: AnnotateConfigBase, lease: Lease, mode: str,
                      plan: Plan, part: Slice, models: dict[str, Any], started: float,
                      planning_s: float) -> dict[str, Any]:
    """The part of the job that writes OUTPUT: only while this run holds its lease."""
    import ray

    started_at = dt.datetime.now(dt.timezone.utc).isoformat()
    storage_options = config.storage.options()
    bounds = part.bounds(plan.unit_count)
    ledger, todo, repairs, staged = recover_output(output_uri, storage_options, plan, part)
    pools: dict[str, Any] = {}
    this_run = {"inputs": 0, "rows": 0, "rejects": 0, "regions": 0, "units": 0, "failed_units": [],
                "discarded_staged_units": staged}
    setup_s = time.perf_counter() - started  # everything before the pipeline
    if todo.num_rows:
        pools = run_units(todo, plan, output_uri, config, models, lease, this_run)
    elif plan.inputs == 0:
        log.warning("input %s yields no inputs (input.allow_empty is on): nothing to do", input_uri)
    execute_s = time.perf_counter() - started - setup_s
    if lease.lost:
        raise LeaseLostError(lease.lost)
    counts = counts_of(ledger.catch_up(output_uri, storage_options), plan, config)
    manifest = {
        "counts": counts,
        "schema_version": SCHEMA_VERSION,
        "run_id": lease.run_id,
        "mode": mode,
        "input": input_uri,
        "input_format": plan.meta["label"],
        "output": output_uri,
        "slice": part.label,
        "started_at": started_at,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "timings_s": {"setup": round(setup_s, 3), "planning": round(planning_s, 3), "execute": round(execute_s, 3),
                      "accounting": round(time.perf_counter() - started - setup_s - execute_s, 3),
                      "total": round(time.perf_counter() - started, 3)},
        "driver_peak_rss_mb": driver_peak_rss_mb(),
        "this_run": {**this_run, "units_range": list(bounds)},
        "plan": {k: plan.meta[k] for k in ("inputs", "units", "unit_rows", "sources", "duplicates", "created_at")},
        "repairs": repairs,
        "lease": {"generation": lease.generation, "took_over": lease.took_over},
        "models": models,
        "resources": {"cluster": ray.cluster_resources(), "gcs_address": ray.get_runtime_context().gcs_address,
                      "pools": {k: vars(v) for k, v in pools.items()}, "torch": torch_version()},
        "config_hash": config.label_hash(),
        "config": config.public_dict(),
    }
    manifest = {"vesl_version": __version__, "schema_version": SCHEMA_VERSION, **manifest}
    manifest["files"] = manifest["counts"].pop("files")  # None past FILES_LISTED units: the records list them
    write_manifest(manifest, output_uri, storage_options)
    return manifest


def recover_output(output_uri: str, storage_options: dict[str, Any], plan: Plan, part: Slice):
    """Put OUTPUT right for this slice and say what is left: strays moved aside, staged parts of units a
    killed run had in flight dropped, units whose files do not match their records redone. Returns the
    ledger, the units to do, the repairs made and the number of half-done units dropped."""
    bounds = part.bounds(plan.unit_count)
    repairs = [r for r in [move_strays(output_uri, storage_options, plan.unit_count)] if r]
    staged = clean_staging(output_uri, storage_options, bounds)  # parts of units a killed run had in flight
    ledger, damaged = read_ledger(output_uri, storage_options, bounds)
    for unit in damaged:
        log.warning("unit %s is redone: its files do not match its completion record: %s", unit["unit"], unit["files"])
    repairs += [{"redone_units": damaged}] if damaged else []
    todo = todo_units(plan, ledger.done, bounds)
    log.info("plan: %d inputs in %d units; this run: units [%d, %d) (slice %s), %d to do%s", plan.inputs,
             plan.unit_count, *bounds, part.label, todo.num_rows,
             f", {staged} half-done unit(s) redone whole" if staged else "")
    return ledger, todo, repairs, staged


def run_units(todo, plan: Plan, output_uri: str, config: AnnotateConfigBase, models: dict[str, Any], lease: Lease,
              this_run: dict[str, Any]) -> dict[str, Any]:
    """Read, annotate and commit the units TODO (a table of plan rows) on Ray Data; returns the stage pools."""
    import ray

    storage_options = config.storage.options()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0  # each GPU stage's device setting is checked per stage
    footer = footer_metadata(config, models)
    units = ray.data.from_arrow(todo).repartition(max(1, min(todo.num_rows, 1024)))
    inputs = units.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=config.ray.read_num_cpus,
                               fn_kwargs={"kind": plan.meta["kind"], "config": config.input,
                                          "storage_options": storage_options})
    inputs = inputs.repartition(target_num_rows_per_block=config.input.block_rows)  # streaming split, no shuffle
    ds, pools = build(inputs, config, storage_options, use_gpu)
    staged_parts = ds.map_batches(stage_unit_parts, batch_size=config.output.rows_per_shard,
                                  batch_format="pyarrow", num_cpus=config.ray.read_num_cpus,
                                  fn_kwargs={"output": output_uri, "footer": footer,
                                             "storage_options": storage_options})
    commit_units(staged_parts, todo, output_uri, footer, config, lease, this_run)
    drop_empty_staging(output_uri, storage_options)
    return pools


def commit_units(staged_parts, todo, output_uri: str, footer: dict[str, str], config: AnnotateConfigBase,
                 lease: Lease, this_run: dict[str, Any]) -> None:
    """Drive the pipeline from here: its last step reports, per batch and unit, the inputs staged and
    the parts written. A unit whose staged inputs reach its planned count is committed by a Ray task
    (shard, rejects file, completion record). The driver holds only the units in flight."""
    import ray

    storage_options = config.storage.options()
    expected = dict(zip(todo.column("unit").to_pylist(), todo.column("count").to_pylist()))
    commit = ray.remote(num_cpus=0.25, max_retries=2)(commit_unit)
    in_flight: dict[int, dict[str, Any]] = {}  # unit -> staged inputs and parts so far
    running: dict[Any, int] = {}  # commit task -> unit
    settled: set[int] = set()

    def settle(block: bool) -> None:
        while running:
            ready, _ = ray.wait(list(running), num_returns=len(running) if block else 1, timeout=None if block else 0)
            if not ready:
                return
            for ref in ready:
                unit = running.pop(ref)
                settled.add(unit)
                try:
                    record = ray.get(ref)
                except UnitAccountingError as e:
                    this_run["failed_units"].append({"unit": unit, "error": str(e)})
                    log.error("%s", e)
                    continue
                for key in ("inputs", "rows", "rejects", "regions"):
                    this_run[key] += record[key]
                this_run["units"] += 1

    def start(unit: int, parts: list[str]) -> None:
        ref = commit.remote(output_uri, unit, expected[unit], parts, footer, storage_options,
                            config.output.compression, lease.token(), lease.run_id)
        running[ref] = unit

    for batch in staged_parts.iter_batches(batch_format="pyarrow", batch_size=None):
        for unit, n, parts in zip(batch.column("unit").to_pylist(), batch.column("inputs").to_pylist(),
                                  batch.column("parts").to_pylist()):
            state = in_flight.setdefault(unit, {"inputs": 0, "parts": []})
            state["inputs"] += n
            state["parts"] += parts
            if state["inputs"] >= expected[unit]:
                start(unit, in_flight.pop(unit)["parts"])  # more than planned: commit_unit refuses it
        settle(block=False)
        if lease.lost:
            raise LeaseLostError(lease.lost)
    for unit, state in in_flight.items():  # fewer inputs than planned came through: refused, with its counts
        start(unit, state["parts"])
    settle(block=True)
    for unit in sorted(set(expected) - settled):
        this_run["failed_units"].append({"unit": unit, "error": f"unit {unit}: no input of it reached the writer"})


def counts_of(ledger, plan: Plan, config: AnnotateConfigBase) -> dict[str, Any]:
    """The manifest's counts, summed from OUTPUT's completion records (all runs and slices), and
    whether they add up: every input of a done unit is one row or one reject, and (once every unit is
    done) the units' inputs are the plan's."""
    counts = account(ledger, plan.inputs, plan.unit_count)
    counts["duplicate_ids"] = plan.meta.get("duplicate_ids", 0)
    counts["funnel"] = funnel(counts["inputs"], counts["by_stage"], funnel_steps(config.active_stages()))
    counts["accounted"] = (counts["rows"] + counts["rejects"] == counts["inputs"] and not counts["units"]["unbalanced"]
                           and counts["funnel"][-1]["passed"] == counts["rows"]
                           and (not counts["complete"] or counts["inputs"] == plan.inputs))
    return counts


def driver_peak_rss_mb() -> float | None:
    """This process's peak resident memory: VmHWM of /proc/self/status (Linux). Not ru_maxrss, which
    Linux carries over an exec from the parent that forked the process (a big launcher inflates it)."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None
    return round(kib / 1024, 1)


def torch_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vesl annotate", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="manifest (.parquet/.jsonl/.csv), WebDataset .tar shard(s), or an image folder")
    p.add_argument("output", help="output folder (local path or s3://...)")
    add_config_arguments(p, "detect.threshold=0.2")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing OUTPUT first (default: resume the run it holds)")
    p.add_argument("--shard", metavar="I/N", help="process only slice I of N of the input's work units (N jobs, "
                   "one OUTPUT: input.slice)")
    return p


USAGE_ERRORS = (OutputConflictError, PlanMismatchError, LeaseHeldError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = args.overrides + (["output.on_existing=overwrite"] if args.overwrite else [])
    overrides += [f"input.slice={args.shard}"] if args.shard else []
    try:
        output = resolve_output(args.output)  # absolute; a relative one inside `ray job submit` is refused
        config = load_config(args.config, args.preset, overrides)
        manifest = run_annotate(args.input, output, config)
    except (Exception, KeyboardInterrupt, Terminated) as e:  # noqa: BLE001 - one line and an exit code each
        code, message = classify(e, USAGE_ERRORS)
        log.debug("annotate failed", exc_info=True)
        print(f"vesl annotate: error: {message}", file=sys.stderr)
        stop_ray()
        return code
    c, run = manifest["counts"], manifest["this_run"]
    resumed = f" (resumed: {run['inputs']} processed now)" if manifest["mode"] == "resume" else ""
    for repair in manifest["repairs"]:
        if "stray_files" in repair:
            print(f"vesl annotate: repaired OUTPUT: moved {len(repair['stray_files'])} file(s) that are no unit's "
                  f"(e.g. {repair['stray_files'][:2]}) to {repair['moved_to']}", file=sys.stderr)
        else:
            print(f"vesl annotate: repaired OUTPUT: redid {len(repair['redone_units'])} unit(s) whose files did not "
                  f"match their completion record (e.g. {repair['redone_units'][:1]})", file=sys.stderr)
    units = c["units"]
    scope = "" if manifest["slice"] == "0/1" else (
        f"slice {manifest['slice']}: {run['units']} unit(s) committed now; dataset: {units['done']}/{units['total']} "
        "units done; ")
    print(f"vesl annotate: {scope}{c['inputs']} inputs -> {c['rows']} rows ({c['regions']} regions), "
          f"{c['rejects']} rejects {c['by_reason'] or ''}{resumed} in {manifest['timings_s']['total']} s; "
          f"manifest: {output.rstrip('/')}/{MANIFEST}")
    for failed in run["failed_units"]:
        print(f"vesl annotate: error: {failed['error']}", file=sys.stderr)
    if not c["accounted"] or run["failed_units"]:
        print("vesl annotate: error: inputs != rows + rejects (or a unit failed its own check); see the manifest",
              file=sys.stderr)
        return EXIT_ACCOUNTING
    return EXIT_OK
