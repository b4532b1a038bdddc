"""The annotate job: inputs -> the registered stages (decode, caption, fuse, phrases, detect) -> region-text
shards in OUTPUT.

Run it as
    python pipelines/annotate.py INPUT OUTPUT [--config FILE.yaml] [--preset tiny] [--set k=v ...]
or `vesl annotate ...`, or under `ray job submit --working-dir . -- python pipelines/annotate.py ...`
(inside a Ray job RAY_ADDRESS is set and the job joins that cluster; otherwise it starts a local one).

A run (`Run`): plan the input once per OUTPUT (or read the saved plan), take OUTPUT's lease, put OUTPUT
right (strays, half-done units), run the units not yet done (`vesl.annotate.pipeline`), then write the
manifest, built from the completion records by `build_manifest`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from operators.registry import check_chain, funnel, funnel_steps
from schemas.region_text import (
    META_CONFIG_HASH,
    META_MODELS,
    META_SCHEMA_VERSION,
    META_THRESHOLDS,
    META_VERSION,
    SCHEMA_VERSION,
)
from vesl import __version__
from vesl.annotate.config import PRESET_HELP, AnnotateConfigBase, load_config, preset_names
from vesl.annotate.output.lease import Lease, LeaseHeldError, LeaseLostError, take_lease
from vesl.annotate.output.ledger import Ledger, account, empty_stage_figures, read_ledger
from vesl.annotate.output.state import (
    check_apart,
    check_output_target,
    clean_staging,
    drop_empty_staging,
    move_strays,
    prepare_output,
    remove_leftovers,
)
from vesl.annotate.output.writer import write_manifest
from vesl.annotate.pipeline import Committed, run_units
from vesl.annotate.sources.plan import EmptyInputError, plan_input
from vesl.annotate.units import (
    Plan,
    PlanMismatchError,
    Slice,
    check_input_unchanged,
    check_plan,
    load_plan,
    make_plan,
    save_plan,
    todo_units,
)
from vesl.core.outdir import MANIFEST, OutputDir
from vesl.core.ray import init_ray, stop_ray
from vesl.core.settings import add_config_arguments
from vesl.core.storage import canonical_uri, resolve_output
from vesl.errors import (
    EXIT_ACCOUNTING,
    EXIT_OK,
    EXIT_USAGE,
    OutputConflictError,
    Terminated,
    classify,
    install_stop_handlers,
)

log = logging.getLogger("vesl.annotate.job")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


@dataclass
class Run:
    """One run of the annotate job: on OUTPUT, for the whole input or one slice of its work units."""

    input_uri: str
    out: OutputDir
    config: AnnotateConfigBase
    part: Slice = Slice()
    started: float = field(default_factory=time.perf_counter)
    started_at: str = field(default_factory=now_iso)
    location: str = field(init=False)  # where the input really is (`canonical_uri`): its identity in OUTPUT
    plan: Plan | None = None
    planning_s: float = 0.0
    ledger: Ledger = field(default_factory=Ledger)  # OUTPUT's completion records, checked against the plan
    damaged: list[dict[str, Any]] = field(default_factory=list)  # units whose files do not match their record
    models: dict[str, Any] = field(default_factory=dict)
    lease: Lease | None = None
    mode: str = ""  # fresh | resume
    repairs: list[dict[str, Any]] = field(default_factory=list)
    discarded_staged_units: int = 0
    committed: Committed = field(default_factory=Committed)
    pools: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.location = canonical_uri(self.input_uri)

    @property
    def bounds(self) -> tuple[int, int]:
        return self.part.bounds(self.plan.unit_count)

    def lap(self, name: str, since: float) -> float:
        """Record the seconds since SINCE as timing NAME; returns now."""
        now = time.perf_counter()
        self.timings_s[name] = round(now - since, 3)
        return now


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


def start_ray(config: AnnotateConfigBase) -> None:
    """Join or start Ray, with the job's Ray Data settings."""
    import ray

    init_ray()
    install_stop_handlers()  # after ray.init, which sets a SIGTERM handler of its own
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = config.ray.no_progress_timeout_s
    ctx.raise_original_map_exception = True  # a full disk stays an OSError through iter_batches (its exit code)
    if config.ray.object_store_budget_mb:
        limits = ctx.execution_options.resource_limits
        budget = config.ray.object_store_budget_mb * 2**20
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=budget)


def run_annotate(input_uri: str, output_uri: str, config: AnnotateConfigBase) -> dict[str, Any]:
    """Run the whole job (or slice `input.slice` of it), or finish a killed one; returns the run
    manifest (also OUTPUT/manifest.json)."""
    check_chain(config.active_stages())  # a config that switches a needed stage off is refused here
    run = Run(input_uri, OutputDir(output_uri, config.storage.options()), config, Slice.parse(config.input.slice))
    check_apart(run.out, input_uri)  # an OUTPUT that is (or holds) the input: refused before anything else
    start_ray(config)
    # Everything that can refuse the job (OUTPUT's bucket, models, input) is checked before OUTPUT is touched.
    check_output_target(run.out)
    run.models = model_provenance_on_ray(config)
    fresh_plan = plan_run(run)
    run.lease = take_lease(run.out, run.part, wait_s=config.output.lease_wait_s, ttl_s=config.output.lease_ttl_s)
    try:
        run.mode = prepare_output(run.out, run.location, config.label_hash(), config.output.on_existing, run.part)
        # every completion record is checked against the plan before a new plan is saved behind them
        replanned = fresh_plan and run.mode == "resume"  # plan.json was missing: the records decide
        run.ledger, run.damaged = read_ledger(run.out, run.bounds, run.plan, replanned=replanned)
        if fresh_plan or run.mode == "fresh":
            save_plan(run.out, run.plan)
    except BaseException:
        run.lease.discard()  # refused: OUTPUT is left as it was found
        raise
    try:
        return execute(run)
    finally:
        run.lease.release()


def plan_run(run: Run) -> bool:
    """Set RUN's plan: OUTPUT's saved one (a resume, another slice) once the input is found unchanged
    since it was made, else a new one (--overwrite always plans afresh). Returns whether it is new."""
    config, options = run.config, run.config.storage.options()
    run.plan = None if config.output.on_existing == "overwrite" else load_plan(run.out)
    if run.plan is not None:
        check_plan(run.plan, run.location, config.input)
        check_input_unchanged(run.plan, run.input_uri, config.input, options, exclude=run.out.uri)
        return False
    started = time.perf_counter()
    sources = plan_input(run.input_uri, config.input, options, exclude=run.out.uri)
    log.info("input %s: %s, %d source(s); it holds %s", run.input_uri, sources.label, len(sources.sources),
             sources.holds())
    run.plan = make_plan(run.location, sources, config.input, options, num_cpus=config.ray.read_num_cpus)
    run.planning_s = time.perf_counter() - started
    if run.plan.inputs == 0 and not config.input.allow_empty:
        raise EmptyInputError(f"input {run.input_uri} yields no inputs: read as {sources.label}, its "
                              f"{len(sources.sources)} source(s) hold no rows; it holds {sources.holds()}. "
                              "Set input.allow_empty=true to accept an empty input")
    return True


def execute(run: Run) -> dict[str, Any]:
    """The part of the job that writes OUTPUT: only while RUN holds its lease."""
    import ray

    setup_done = run.lap("setup", run.started)  # everything before the pipeline
    ledger, todo = recover_output(run)
    if todo.num_rows:
        footer = footer_metadata(run.config, run.models)
        run.pools = run_units(todo, run.plan, run.out, run.config, footer, run.lease, run.committed)
    elif run.plan.inputs == 0:
        log.warning("input %s yields no inputs (input.allow_empty is on): nothing to do", run.input_uri)
    drop_empty_staging(run.out)
    executed = run.lap("execute", setup_done)
    if run.lease.lost:
        raise LeaseLostError(run.lease.lost)
    counts = counts_of(ledger.catch_up(run.out), run.plan, run.config)
    run.lap("accounting", executed)
    run.lap("total", run.started)
    run.timings_s["planning"] = round(run.planning_s, 3)
    resources = {"cluster": ray.cluster_resources(), "gcs_address": ray.get_runtime_context().gcs_address,
                 "pools": {k: vars(v) for k, v in run.pools.items()}, "torch": torch_version()}
    manifest = build_manifest(run, counts, ledger, resources, driver_peak_rss_mb(), now_iso())
    write_manifest(manifest, run.out)
    return manifest


def recover_output(run: Run):
    """Put OUTPUT right for RUN's slice and say what is left: strays moved aside, staged parts of units a
    killed run had in flight dropped, units whose files did not match their records (found by `read_ledger`)
    redone. Returns the ledger and the units to do; RUN records the repairs."""
    bounds = run.bounds
    run.repairs = [r for r in [move_strays(run.out, run.plan.unit_count)] if r]
    run.discarded_staged_units = clean_staging(run.out, bounds)  # parts of units a killed run had in flight
    leftovers = remove_leftovers(run.out, bounds, stale_s=run.config.output.lease_ttl_s)  # of interrupted writes
    run.repairs += [{"temporary_files_removed": leftovers}] if leftovers else []
    for unit in run.damaged:
        log.warning("unit %s is redone: its files do not match its completion record: %s", unit["unit"], unit["files"])
    run.repairs += [{"redone_units": run.damaged}] if run.damaged else []
    todo = todo_units(run.plan, run.ledger.done, bounds)
    staged = run.discarded_staged_units
    log.info("plan: %d inputs in %d units; this run: units [%d, %d) (slice %s), %d to do%s", run.plan.inputs,
             run.plan.unit_count, *bounds, run.part.label, todo.num_rows,
             f", {staged} half-done unit(s) redone whole" if staged else "")
    return run.ledger, todo


def counts_of(ledger: Ledger, plan: Plan, config: AnnotateConfigBase) -> dict[str, Any]:
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


def stage_figures(ledger: Ledger, config: AnnotateConfigBase) -> dict[str, dict[str, Any]]:
    """Per active stage, in order, over every committed unit: rows in, rejects by reason, seconds (summed
    over its workers: busy time, not wall time), rows/s (one worker's rate) and the sums of its counts
    (`metrics`: a model stage's prompt and generated tokens)."""
    out = {}
    for stage in config.active_stages():
        figures = ledger.stages.get(stage.name, empty_stage_figures())
        seconds = figures["seconds"]
        out[stage.name] = {"rows": figures["rows"], "rejects": dict(sorted(figures["rejects"].items())),
                           "seconds": round(seconds, 6),
                           "rows_per_s": round(figures["rows"] / seconds, 2) if seconds > 0 else None}
        if figures.get("metrics"):  # a model stage's token counts: sums, and per row it answered
            out[stage.name]["metrics"] = dict(sorted(figures["metrics"].items()))
    return out


def build_manifest(run: Run, counts: dict[str, Any], ledger: Ledger, resources: dict[str, Any],
                   driver_peak_rss: float | None, finished_at: str) -> dict[str, Any]:
    """The run manifest (OUTPUT/manifest.json) of RUN, from its counts and OUTPUT's ledger. Pure."""
    plan, config = run.plan, run.config
    counts = dict(counts)
    files = counts.pop("files")  # None past FILES_LISTED units: the records list them
    return {
        "vesl_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "counts": counts,
        "stages": stage_figures(ledger, config),
        "run_id": run.lease.run_id,
        "mode": run.mode,
        "input": run.input_uri,
        "input_location": run.location,
        "input_format": plan.meta["label"],
        "output": run.out.uri,
        "slice": run.part.label,
        "started_at": run.started_at,
        "finished_at": finished_at,
        "timings_s": run.timings_s,
        "driver_peak_rss_mb": driver_peak_rss,
        "this_run": {**asdict(run.committed), "discarded_staged_units": run.discarded_staged_units,
                     "units_range": list(run.bounds)},
        "plan": {k: plan.meta[k] for k in ("inputs", "units", "unit_rows", "sources", "duplicates", "created_at")},
        "repairs": run.repairs,
        "lease": {"generation": run.lease.generation, "took_over": run.lease.took_over},
        "models": run.models,
        "resources": resources,
        "config_hash": config.label_hash(),
        "config": config.public_dict(),
        "files": files,
    }


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
    p.add_argument("input", help="manifest (.parquet/.jsonl/.csv), WebDataset .tar file(s), img2dataset's output, "
                   "or an image folder")
    p.add_argument("output", help="output folder (local path or s3://...)")
    add_config_arguments(p, "detect.threshold=0.2", preset_names(), PRESET_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing OUTPUT first (default: resume the run it holds)")
    p.add_argument("--slice", metavar="I/N", help="process only slice I of N of the input's work units (N jobs, "
                   "one OUTPUT: input.slice)")
    p.add_argument("--shard", help=argparse.SUPPRESS)  # renamed --slice: answered with a one-line error
    return p


USAGE_ERRORS = (OutputConflictError, PlanMismatchError, LeaseHeldError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.shard is not None:
        print(f"vesl annotate: error: --shard is now --slice: use --slice {args.shard}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = args.overrides + (["output.on_existing=overwrite"] if args.overwrite else [])
    overrides += [f"input.slice={args.slice}"] if args.slice else []
    try:
        output = resolve_output(args.output)  # absolute; a relative one inside `ray job submit` is refused
        config = load_config(args.config, args.preset, overrides)
        manifest = run_annotate(args.input, output, config)
    except (Exception, KeyboardInterrupt, Terminated) as e:  # noqa: BLE001 - one line and an exit code each
        code, message = classify(e, USAGE_ERRORS)
        log.debug("annotate failed", exc_info=True)
        print(f"vesl annotate: error: {message}", file=sys.stderr)
    else:
        return report(manifest)
    # The failed pipeline's actor handles can sit in reference cycles (through the error's frames, gone now):
    # collect them now, so its actors can give their CPUs back before some later collection. It matters to a
    # later run in this process on a Ray it joined; a Ray this process started is shut down here anyway.
    gc.collect()
    stop_ray()
    return code


def report(manifest: dict[str, Any]) -> int:
    """Print the run's summary (and its repairs and failed units) to the terminal; the exit code."""
    c, run = manifest["counts"], manifest["this_run"]
    resumed = f" (resumed: {run['inputs']} processed now)" if manifest["mode"] == "resume" else ""
    for repair in manifest["repairs"]:
        if "stray_files" in repair:
            print(f"vesl annotate: repaired OUTPUT: moved {len(repair['stray_files'])} file(s) that are no unit's "
                  f"(e.g. {repair['stray_files'][:2]}) to {repair['moved_to']}", file=sys.stderr)
        elif "temporary_files_removed" in repair:
            print(f"vesl annotate: repaired OUTPUT: removed {len(repair['temporary_files_removed'])} temporary file(s) "
                  f"that interrupted writes left (e.g. {repair['temporary_files_removed'][:2]})", file=sys.stderr)
        else:
            print(f"vesl annotate: repaired OUTPUT: redid {len(repair['redone_units'])} unit(s) whose files did not "
                  f"match their completion record (e.g. {repair['redone_units'][:1]})", file=sys.stderr)
    units = c["units"]
    scope = "" if manifest["slice"] == "0/1" else (
        f"slice {manifest['slice']}: {run['units']} unit(s) committed now; dataset: {units['done']}/{units['total']} "
        "units done; ")
    print(f"vesl annotate: {scope}{c['inputs']} inputs -> {c['rows']} rows ({c['regions']} regions), "
          f"{c['rejects']} rejects {c['by_reason'] or ''}{resumed} in {manifest['timings_s']['total']} s; "
          f"manifest: {manifest['output']}/{MANIFEST}")
    for failed in run["failed_units"]:
        print(f"vesl annotate: error: {failed['error']}", file=sys.stderr)
    if not c["accounted"] or run["failed_units"]:
        print("vesl annotate: error: inputs != rows + rejects (or a unit failed its own check); see the manifest",
              file=sys.stderr)
        return EXIT_ACCOUNTING
    return EXIT_OK
