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
from vesl.inputs import EmptyInputError, read_inputs
from vesl.lease import Lease, LeaseHeldError, LeaseLostError
from vesl.resources import plan_pools
from vesl.runstate import (
    OutputConflictError,
    check_output_target,
    completed,
    count_outputs,
    find_duplicates,
    funnel,
    output_files,
    plan_batch,
    prepare_output,
    repair_duplicates,
    take_lease,
)
from vesl.writer import MANIFEST, make_datasink, merge_counts, write_manifest

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
    """Run the whole job, or finish a killed one; returns the run manifest (also OUTPUT/manifest.json)."""
    import ray

    started = time.perf_counter()
    check_chain(config.active_stages())  # a config that switches a needed stage off is refused here
    storage_options = config.storage.options()
    init_ray()
    install_stop_handlers()  # after ray.init, which sets a SIGTERM handler of its own
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = config.ray.no_progress_timeout_s
    if config.ray.object_store_budget_mb:
        limits = ctx.execution_options.resource_limits
        budget = config.ray.object_store_budget_mb * 2**20
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    # Everything that can refuse the job (OUTPUT's bucket, models, input) is checked before OUTPUT is touched.
    check_output_target(output_uri, storage_options)
    models = model_provenance(config)
    inputs, plan = read_inputs(input_uri, config.input, storage_options, num_cpus=config.ray.read_num_cpus)
    log.info("input %s: %s, %d unit(s) to read; it holds %s", input_uri, plan.label, len(plan.units), plan.holds())
    # Planning pass over ids only: how many inputs, which ids repeat (and, below, what earlier runs finished).
    total_inputs, duplicates = find_duplicates(inputs)
    if total_inputs == 0 and not config.input.allow_empty:
        raise EmptyInputError(f"input {input_uri} yields no inputs: read as {plan.label}, its {len(plan.units)} "
                              f"unit(s) hold no rows; it holds {plan.holds()}. Set input.allow_empty=true to accept "
                              "an empty input")
    lease = take_lease(output_uri, storage_options, wait_s=config.output.lease_wait_s)
    try:
        mode = prepare_output(output_uri, input_uri, config.label_hash(), config.output.on_existing, storage_options)
    except BaseException:
        lease.discard()  # refused: OUTPUT is left as it was found
        raise
    try:
        return run_holding_lease(input_uri, output_uri, config, lease, mode, inputs, plan, total_inputs,
                                 duplicates, models, started)
    finally:
        lease.release()


def run_holding_lease(input_uri: str, output_uri: str, config: AnnotateConfigBase, lease: Lease, mode: str, inputs,
                      plan, total_inputs: int, duplicates: dict[str, int], models: dict[str, Any],
                      started: float) -> dict[str, Any]:
    """The part of the job that writes OUTPUT: only while this run holds its lease."""
    import ray
    import torch

    started_at = dt.datetime.now(dt.timezone.utc).isoformat()
    storage_options = config.storage.options()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0  # each GPU stage's device setting is checked per stage
    repairs = [r for r in [repair_duplicates(output_uri, storage_options)] if r]  # before resume reads OUTPUT
    run_id = lease.run_id
    done_ids, done_ordinals = completed(output_uri, storage_options)  # both empty on a fresh run
    todo = inputs.map_batches(plan_batch, batch_format="pyarrow", fn_kwargs={
        "duplicates": duplicates, "done_ids": done_ids, "done_ordinals": done_ordinals})
    todo = todo.repartition(target_num_rows_per_block=config.input.block_rows)  # streaming split, no shuffle
    ds, pools = build(todo, config, storage_options, use_gpu)
    sink = make_datasink(output_uri, run_id, footer_metadata(config, models), storage_options,
                         config.output.rows_per_shard, config.output.compression, lease.token())
    setup_s = time.perf_counter() - started
    if total_inputs:
        ds.write_datasink(sink)
    else:  # input.allow_empty: no model is loaded for nothing
        log.warning("input %s yields no inputs (input.allow_empty is on): nothing to do", input_uri)
    execute_s = time.perf_counter() - started - setup_s
    if lease.lost:
        raise LeaseLostError(lease.lost)
    this_run = merge_counts(sink.results)
    repairs += [r for r in [repair_duplicates(output_uri, storage_options)] if r]  # a writer that slipped past
    manifest = {
        "counts": account(output_uri, storage_options, total_inputs, duplicates, config),
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "mode": mode,
        "input": input_uri,
        "input_format": plan.label,
        "output": output_uri,
        "started_at": started_at,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "timings_s": {"setup": round(setup_s, 3), "execute": round(execute_s, 3),
                      "total": round(time.perf_counter() - started, 3)},
        "this_run": {k: this_run[k] for k in ("inputs", "rows", "rejects", "regions", "by_reason")},
        "repairs": repairs,
        "lease": {"generation": lease.generation, "took_over": lease.took_over},
        "models": models,
        "resources": {"cluster": ray.cluster_resources(), "gcs_address": ray.get_runtime_context().gcs_address,
                      "pools": {k: vars(v) for k, v in pools.items()}, "torch": torch.__version__},
        "config_hash": config.label_hash(),
        "config": config.public_dict(),
        "files": output_files(output_uri, storage_options),
    }
    manifest = {"vesl_version": __version__, "schema_version": SCHEMA_VERSION, **manifest}
    write_manifest(manifest, output_uri, storage_options)
    return manifest


def account(output_uri: str, storage_options: dict, total_inputs: int, duplicates: dict[str, int],
            config: AnnotateConfigBase) -> dict[str, Any]:
    """The manifest's counts, read back from every file in OUTPUT (all runs that wrote there), and
    whether they add up: every input is one row or one reject, and no image_id appears twice."""
    counts = count_outputs(output_uri, storage_options)
    counts["inputs"] = total_inputs
    counts["duplicate_ids"] = len(duplicates)
    counts["funnel"] = funnel(total_inputs, counts["by_stage"], funnel_steps(config.active_stages()))
    counts["accounted"] = (counts["rows"] + counts["rejects"] == total_inputs
                           and counts["unique_row_ids"] == counts["rows"]
                           and counts["funnel"][-1]["passed"] == counts["rows"])
    return counts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vesl annotate", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="manifest (.parquet/.jsonl/.csv), WebDataset .tar shard(s), or an image folder")
    p.add_argument("output", help="output folder (local path or s3://...)")
    add_config_arguments(p, "detect.threshold=0.2")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing OUTPUT first (default: resume the run it holds)")
    return p


USAGE_ERRORS = (OutputConflictError, LeaseHeldError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = args.overrides + (["output.on_existing=overwrite"] if args.overwrite else [])
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
        print(f"vesl annotate: repaired OUTPUT: removed {repair['rows_removed']} duplicate row(s) of "
              f"{repair['distinct_image_ids']} image_id(s) (e.g. {repair['image_ids'][:3]}) and "
              f"{repair['rejects_removed']} duplicate reject(s), keeping the first committed copy; "
              f"files changed: {len(repair['files_changed'])}", file=sys.stderr)
    print(f"vesl annotate: {c['inputs']} inputs -> {c['rows']} rows ({c['regions']} regions), "
          f"{c['rejects']} rejects {c['by_reason'] or ''}{resumed} in {manifest['timings_s']['total']} s; "
          f"manifest: {output.rstrip('/')}/{MANIFEST}")
    if not c["accounted"]:
        print("vesl annotate: error: inputs != rows + rejects, or an image_id appears twice; see the manifest",
              file=sys.stderr)
    return EXIT_OK if c["accounted"] else EXIT_ACCOUNTING
