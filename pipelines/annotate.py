"""The annotate job: inputs -> decode -> caption -> phrases -> detect -> region-text shards.

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
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.preflight import require_dependencies  # noqa: E402  (standard library only)

require_dependencies("vesl annotate")

from operators.caption import CaptionImages  # noqa: E402
from operators.decode import decode_images  # noqa: E402
from operators.detect import DetectRegions  # noqa: E402
from operators.phrases import ExtractPhrases  # noqa: E402
from schemas.region_text import META_PREFIX, META_SCHEMA_VERSION, SCHEMA_VERSION  # noqa: E402
from vesl import __version__  # noqa: E402
from vesl.config import AnnotateConfig, add_config_arguments, load_config  # noqa: E402
from vesl.errors import EXIT_ACCOUNTING, EXIT_OK, Terminated, classify, install_stop_handlers  # noqa: E402
from vesl.inputs import EmptyInputError, read_inputs  # noqa: E402
from vesl.lease import Lease, LeaseHeldError, LeaseLostError  # noqa: E402
from vesl.resources import plan_pools  # noqa: E402
from vesl.runstate import (  # noqa: E402
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
from vesl.storage import resolve_output  # noqa: E402
from vesl.writer import MANIFEST, make_datasink, merge_counts, write_manifest  # noqa: E402

log = logging.getLogger("vesl.annotate")


def footer_metadata(config: AnnotateConfig, models: dict[str, Any]) -> dict[str, str]:
    return {
        META_SCHEMA_VERSION: SCHEMA_VERSION,
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}models": json.dumps(models, sort_keys=True),
        f"{META_PREFIX}thresholds": json.dumps(
            {"detect_threshold": config.detect.threshold, "nms_iou": config.detect.nms_iou,
             "top_k": config.detect.top_k, "min_box_pixels": config.detect.min_box_pixels,
             "max_phrases": config.phrases.max_phrases}, sort_keys=True),
        f"{META_PREFIX}config_hash": config.label_hash(),
    }


def model_provenance(config: AnnotateConfig) -> dict[str, Any]:
    """What the footer records about the models, read from their configs without loading weights."""
    from transformers import AutoConfig

    out = {}
    for stage, cfg in (("captioner", config.caption), ("detector", config.detect)):
        hf = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        out[stage] = {"id": cfg.model, "revision": getattr(hf, "_commit_hash", None) or cfg.revision or "local",
                      "class": (hf.architectures or [type(hf).__name__])[0]}
    out["spacy"] = {"id": config.phrases.spacy_model}
    return out


_STARTED_RAY = False  # this process called ray.init (and so shuts Ray down when the job fails)


def init_ray(log_to_driver: bool = True, dashboard: bool = False) -> None:
    """Join the cluster of RAY_ADDRESS, else start a fresh local instance. DASHBOARD starts the local
    instance's dashboard, which Ray's state API needs (Ray Train's placement-group cleaner polls it)."""
    import ray

    global _STARTED_RAY
    if ray.is_initialized():
        return
    _STARTED_RAY = True
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)  # inside `ray job submit`, or pointed at a cluster
    else:
        # "local": always a fresh instance, never a cluster some earlier `ray start` left behind
        ray.init(address="local", include_dashboard=dashboard, log_to_driver=log_to_driver)


def build(ds, config: AnnotateConfig, storage_options: dict, use_gpu: bool):
    """Chain the stages onto DS (a Dataset of input rows)."""
    import ray

    resources = ray.cluster_resources()
    pools = plan_pools(resources.get("CPU", 1.0), resources.get("GPU", 0.0), config.ray, use_gpu=use_gpu)
    log.info("actor pools: %s", {k: vars(v) for k, v in pools.items()})
    common = dict(batch_format="pyarrow", udf_modifying_row_count=False)
    ds = ds.map_batches(decode_images, fn_kwargs={"config": config.decode, "storage_options": storage_options},
                        batch_size=config.decode.batch_size, num_cpus=config.ray.decode_num_cpus, **common)
    for stage, cls, cfg in (("caption", CaptionImages, config.caption), ("phrase", ExtractPhrases, config.phrases),
                            ("detect", DetectRegions, config.detect)):
        pool = pools[stage]
        remote_args = {"num_gpus": pool.num_gpus} if pool.num_gpus > 0 else {}
        if pool.resources:
            remote_args["resources"] = dict(pool.resources)
        # The phrase stage takes one block per call (its batch_size is nlp.pipe's): bundling many blocks of
        # decoded images into one call would emit one huge block and stall the stages around it.
        batch_size = config.input.block_rows if stage == "phrase" else cfg.batch_size
        ds = ds.map_batches(cls, fn_constructor_kwargs={"config": cfg}, batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=pool.size), num_cpus=pool.num_cpus,
                            **remote_args, **common)
    return ds, pools


def run_annotate(input_uri: str, output_uri: str, config: AnnotateConfig) -> dict[str, Any]:
    """Run the whole job, or finish a killed one; returns the run manifest (also OUTPUT/manifest.json)."""
    import ray

    started = time.perf_counter()
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


def run_holding_lease(input_uri: str, output_uri: str, config: AnnotateConfig, lease: Lease, mode: str, inputs,
                      plan, total_inputs: int, duplicates: dict[str, int], models: dict[str, Any],
                      started: float) -> dict[str, Any]:
    """The part of the job that writes OUTPUT: only while this run holds its lease."""
    import ray
    import torch

    started_at = dt.datetime.now(dt.timezone.utc).isoformat()
    storage_options = config.storage.options()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and "cpu" not in (config.caption.device, config.detect.device)
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
    counts = count_outputs(output_uri, storage_options)  # every file in OUTPUT, all runs
    counts["inputs"] = total_inputs
    counts["duplicate_ids"] = len(duplicates)
    counts["funnel"] = funnel(total_inputs, counts["by_stage"])
    counts["accounted"] = (counts["rows"] + counts["rejects"] == total_inputs
                           and counts["unique_row_ids"] == counts["rows"]
                           and counts["funnel"][-1]["passed"] == counts["rows"])
    manifest = {
        "vesl_version": __version__,
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
        "counts": counts,
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
    write_manifest(manifest, output_uri, storage_options)
    return manifest


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


def stop_ray() -> None:
    """Shut down the Ray this job started (a local instance takes its workers with it), so nothing
    outlives a failed job. A Ray the caller started is left to the caller."""
    try:
        import ray

        if _STARTED_RAY and ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


if __name__ == "__main__":
    sys.exit(main())
