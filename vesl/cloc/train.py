"""Train CLOC on region-text shards with Ray Train.

The driver (`run_training`) checks the shards, builds the Ray Data preprocessing pipeline and a
`TorchTrainer` whose workers run `train_loop` (DDP through `prepare_model`, data through
`get_dataset_shard`). Re-running with the same OUT resumes from the last checkpoint: Ray Train
hands it to the workers via `get_checkpoint()` when a run of the same name and storage exists.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from vesl.cloc.config import TrainConfig

log = logging.getLogger("vesl.train")
RUN_NAME = "run"
STATE_FILE = "_vesl_train.json"


# ---------------------------------------------------------------------------------------- worker side

def make_scheduler(optimizer, warmup: int, total: int, schedule: str):
    """transformers' schedules: linear warm-up over WARMUP steps, then constant or cosine decay to 0 at
    TOTAL."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, embeddings, prompt-type vectors and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("_type")
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def to_tensors(batch: dict[str, Any], device) -> dict[str, Any]:
    import numpy as np
    import torch

    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            out[key] = torch.from_numpy(np.ascontiguousarray(value)).to(device, non_blocking=True)
        else:
            out[key] = value
    return out


def step_inputs(batch: dict[str, Any], m: int, generator, with_regions: bool) -> dict[str, Any]:
    """Model inputs of one step: the batch's images and captions, and up to M sampled regions per
    image (flattened); rows whose image failed to load carry no regions and are dropped."""
    ok = batch["ok"]
    inputs = {"pixels": batch["pixels"][ok], "input_ids": batch["input_ids"][ok],
              "attention_mask": batch["attention_mask"][ok]}
    if not with_regions:
        return inputs
    from vesl.cloc.data import sample_regions

    image_index, slot = sample_regions(batch["region_valid"][ok], m, generator)
    inputs.update(
        image_index=image_index, boxes=batch["region_boxes"][ok][image_index, slot],
        phrase_ids=batch["phrase_ids"][ok][image_index, slot], phrase_mask=batch["phrase_mask"][ok][image_index, slot],
        keys=batch["region_keys"][ok][image_index, slot],
    )
    return inputs


def _say(message: str) -> None:
    """A progress line from a worker. Not print(): Ray Train patches print into its logging, and the
    line would reach the driver twice."""
    import sys

    sys.stdout.write(f"[vesl train] {message}\n")
    sys.stdout.flush()


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


REPORTED = ("loss", "clip", "cloc", "grounding", "masked_negatives")


class TrainWorker:
    """One Ray Train worker: builds or restores the model, iterates its dataset shard, reports metrics
    and checkpoints. Every worker takes the same decisions at the same steps (DDP needs that)."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch
        import torch

        self.config = config = TrainConfig.model_validate(loop_config["config"])
        self.total_steps, self.out_local = loop_config["total_steps"], loop_config.get("metrics_path")
        self.rows = loop_config.get("rows") or 0  # in the shards: the unreadable share is judged after min(100, rows)
        self.quiet = bool(loop_config.get("driver_bar"))  # the driver draws a bar from metrics.jsonl instead
        self.rank = ray.train.get_context().get_world_rank()
        torch.set_num_threads(config.run.torch_threads or max(1, math.ceil(config.run.cpus_per_worker)))
        self.device = ray.train.torch.get_device()
        self.use_bf16 = config.run.precision == "bf16" or (config.run.precision == "auto"
                                                           and self.device.type == "cuda")
        self.with_regions = config.loss.region_weight > 0
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "rows_skipped": 0, "rows_seen": 0,
                                      "batches_skipped": 0, "train_s": 0.0}
        self.failures: list[str] = []  # the first images that could not be read, for the stop line
        self.metrics: list[dict[str, Any]] = []
        restored = ray.train.get_checkpoint()
        restored_dir = restored.to_directory() if restored else None  # a local copy (storage may be remote)
        self.build_model(restored_dir)
        self.build_optimizer(restored_dir)
        if self.rank == 0 and self.out_local:  # the live metrics file restarts from what the checkpoint knew
            Path(self.out_local).write_text("".join(json.dumps(m, sort_keys=True) + "\n" for m in self.metrics))
        # region sampling: seeded per worker and per starting step, so a resumed run is reproducible too
        self.sampler = torch.Generator().manual_seed((config.run.seed * 1_000_003 + self.rank) * 1_000_003
                                                     + self.state["step"])

    def build_model(self, restored_dir: str | None) -> None:
        import ray.train.torch
        import torch
        from transformers import CLIPModel

        from vesl.cloc import checkpoint as ckpt
        from vesl.cloc.loss import ClocLoss
        from vesl.cloc.model import ClocModel
        from vesl.core.models import load_pretrained, load_processor

        config = self.config
        if restored_dir:
            source, revision = str(Path(restored_dir) / ckpt.CLIP_DIR), None
        else:
            source, revision = config.model.clip, config.model.revision
        self.processor = load_processor(source, revision=revision, trust_remote_code=config.model.trust_remote_code)
        torch.manual_seed(config.run.seed)  # the same Prompter initialisation on every worker
        clip = load_pretrained(CLIPModel, source, revision=revision, trust_remote_code=config.model.trust_remote_code,
                               device="cpu", dtype=torch.float32, attn_implementation="sdpa").train()
        image_processor = self.processor.image_processor
        self.model = ClocModel(clip, config.model.prompter, tuple(image_processor.image_mean),
                               tuple(image_processor.image_std))
        if restored_dir:
            from safetensors.torch import load_file

            self.model.load_state_dict(load_file(str(Path(restored_dir) / ckpt.WEIGHTS)), strict=False)
        elif config.loss.temperature is not None:
            with torch.no_grad():
                clip.logit_scale.fill_(math.log(1.0 / config.loss.temperature))
        if not config.loss.learn_temperature:
            clip.logit_scale.requires_grad_(False)
        self.ddp = ray.train.torch.prepare_model(
            self.model, parallel_strategy_kwargs={"find_unused_parameters": not self.with_regions})
        self.loss_fn = ClocLoss(config.loss)

    def build_optimizer(self, restored_dir: str | None) -> None:
        import torch

        from vesl.cloc import checkpoint as ckpt

        optim = self.config.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, optim.weight_decay), lr=optim.lr,
                                           betas=optim.betas)
        self.scheduler = make_scheduler(self.optimizer, optim.warmup_steps, self.total_steps, optim.schedule)
        if restored_dir:
            saved = ckpt.load_trainer_state(restored_dir)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.state.update({k: saved[k] for k in self.state if k in saved})
            self.metrics = [m for m in ckpt.load_metrics(restored_dir) if m["step"] <= self.state["step"]]
            if self.rank == 0:
                _say(f"resumed from step {self.state['step']} (epoch {self.state['epoch']})")

    def save(self, directory: str) -> None:
        from vesl.cloc import checkpoint as ckpt

        trainer_state = {**self.state, "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict()}
        ckpt.save_checkpoint(directory, self.model, self.processor,
                             {"step": self.state["step"], "epoch": self.state["epoch"],
                              "training": self.config.public_dict()}, trainer_state, self.metrics)

    def count_unreadable(self, batch: dict[str, Any]) -> bool:
        """Count BATCH's rows without a readable image (every worker sums every worker's); returns whether the
        step is skipped: some worker's batch has no image at all (the workers must agree, or DDP would
        wait forever). Raises UnreadableImagesError past data.max_unreadable_share."""
        from vesl.cloc.data import UnreadableImagesError, unreadable_line

        ok = batch["ok"]
        bad = [f"{i}: {r}" for i, r in zip(batch["image_id"][~ok], batch["skip_reason"][~ok])]
        self.failures = (self.failures + bad)[:3]
        seen, skipped, empty = _all_reduce([float(len(ok)), float(len(bad)), float(not ok.any())])
        state, data = self.state, self.config.data
        state["rows_seen"] += int(seen)
        state["rows_skipped"] += int(skipped)
        global_batch = self.config.optim.batch_size * self.config.run.num_workers
        judged_after = min(max(global_batch, 100), self.rows or global_batch)
        if (state["rows_seen"] >= judged_after
                and state["rows_skipped"] > data.max_unreadable_share * state["rows_seen"]):
            raise UnreadableImagesError(unreadable_line(state["rows_skipped"], state["rows_seen"],
                                                        data.max_unreadable_share, self.failures, "rows read so far"))
        if empty:
            state["batches_skipped"] += 1
            if self.rank == 0:
                _say(f"batch {state['batch_in_epoch']} of epoch {state['epoch']} skipped: no image of it could be "
                     f"read (e.g. {(bad or ['another worker'])[0]})")
        return bool(empty)

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One optimiser step on BATCH; returns the loss parts."""
        import torch

        config = self.config
        t0 = time.perf_counter()
        batch = to_tensors(batch, self.device)
        inputs = step_inputs(batch, config.loss.regions_per_image, self.sampler, self.with_regions)
        keys = inputs.pop("keys", None)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            out = self.ddp(**inputs)
            parts = self.loss_fn(out, inputs.get("boxes"), keys, step=self.state["step"])
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.clip.logit_scale.clamp_(0, math.log(config.loss.max_logit_scale))
        self.state["step"] += 1
        self.state["train_s"] += time.perf_counter() - t0
        parts["images"] = int(batch["ok"].sum())
        return parts

    def log_window(self, window: dict[str, float], elapsed: float, budget_s: float | None) -> bool:
        """Record the metrics of the steps since the last record (all workers agree on the figures);
        returns whether the time budget is spent."""
        state = self.state
        images, over = _all_reduce([window["images"], float(bool(budget_s and state["train_s"] > budget_s))])
        skipped = state["rows_skipped"]
        record = {"step": state["step"], "epoch": state["epoch"], "lr": self.scheduler.get_last_lr()[0],
                  "temperature": 1.0 / float(self.model.clip.logit_scale.detach().exp()),
                  "images_per_s": images / elapsed if elapsed > 0 else None,
                  "rows_skipped": int(skipped), "batches_skipped": state["batches_skipped"],
                  "train_s": round(state["train_s"], 2)}
        record.update({k: window[k] / window["steps"] for k in REPORTED if k in ("loss", "clip") or self.with_regions})
        self.metrics.append(record)
        if self.rank == 0:
            parts_text = " ".join(f"{k} {record[k]:.4f}" for k in ("clip", "cloc", "grounding") if k in record)
            if not self.quiet:
                _say(f"step {state['step']}/{self.total_steps} epoch {state['epoch']} loss "
                     f"{record.get('loss', 0):.4f} ({parts_text}) {record['images_per_s'] or 0:.0f} img/s"
                     + (f" {int(skipped)} rows skipped" if skipped else ""))
            if self.out_local:
                with open(self.out_local, "a") as f:
                    f.write(json.dumps(record, sort_keys=True) + "\n")
        return bool(over)

    def run(self) -> None:
        import ray.train

        config, state = self.config, self.state
        shard = ray.train.get_dataset_shard("train")
        budget_s = config.optim.max_minutes * 60 if config.optim.max_minutes else None
        window = dict.fromkeys(REPORTED, 0.0) | {"images": 0, "steps": 0}
        window_start = time.perf_counter()
        stop = state["step"] >= self.total_steps
        while not stop and state["epoch"] < config.optim.epochs:
            batches = shard.iter_batches(batch_size=config.optim.batch_size, batch_format="numpy", drop_last=True,
                                         local_shuffle_buffer_size=config.data.shuffle_buffer_rows or None,
                                         local_shuffle_seed=config.run.seed + state["epoch"] * 1000 + self.rank)
            for index, batch in enumerate(batches):
                if index < state["batch_in_epoch"]:
                    continue  # resuming mid-epoch: these batches were trained on before the checkpoint
                if self.count_unreadable(batch):
                    state["batch_in_epoch"] = index + 1
                    continue
                parts = self.step(batch)
                state["batch_in_epoch"] = index + 1
                for k in REPORTED:
                    if k in parts:
                        window[k] += float(parts[k].detach())
                window["images"] += parts["images"]
                window["steps"] += 1
                last = state["step"] >= self.total_steps
                if state["step"] % config.run.log_every_steps == 0 or last:
                    stop = self.log_window(window, time.perf_counter() - window_start, budget_s)
                    window, window_start = dict.fromkeys(window, 0.0), time.perf_counter()
                if state["step"] % config.run.checkpoint_every_steps == 0 or last or stop:
                    _report(self.save, self.rank, dict(self.metrics[-1]) if self.metrics else {"step": state["step"]})
                if last or stop:
                    stop = True
                    break
            else:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
        if self.metrics and state["step"] % config.run.checkpoint_every_steps != 0 and not stop:
            _report(self.save, self.rank, dict(self.metrics[-1]))  # ran out of epochs between checkpoints


def train_loop(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function."""
    TrainWorker(loop_config).run()


def _report(save, rank: int, record: dict[str, Any]) -> None:
    import tempfile

    import ray.train

    record = {k: v for k, v in record.items() if v is not None}
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(record, checkpoint=None)


# ---------------------------------------------------------------------------------------- driver side

class TrainConflictError(RuntimeError):
    """OUT holds a training run with a different configuration."""


class MetricsBar:
    """A tqdm bar of training steps on the driver, fed by polling the rank-0 worker's metrics.jsonl
    (one record per `run.log_every_steps`). PATH None: no bar."""

    def __init__(self, path: Path | None, total_steps: int, poll_s: float = 1.0, file=None):
        self.path, self.total, self.poll_s, self.file = path, total_steps, poll_s, file
        self.stop = None

    def _run(self, bar) -> None:
        shown = 0
        while True:
            stopping = self.stop.wait(self.poll_s)
            try:
                lines = self.path.read_text().splitlines() if self.path.exists() else []
                last = json.loads(lines[-1]) if lines else None
            except (OSError, ValueError):
                last = None
            if last and last.get("step", 0) != shown:
                bar.update(last["step"] - shown)
                shown = last["step"]
                bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}",
                                img_s=f"{last.get('images_per_s') or 0:.0f}")
            if stopping:
                return

    def __enter__(self):
        import threading

        if self.path is None:
            return self
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc="vesl train", unit="step", file=self.file or sys.stderr)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(self.bar,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.stop is not None:
            self.stop.set()
            self.thread.join()
            self.bar.close()


def _local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def prepare_train_output(out: str, config: TrainConfig, overwrite: bool) -> bool:
    """Claim OUT for this training config. Returns True when an earlier run is resumed."""
    from vesl.core.storage import filesystem, join_uri

    fs, path = filesystem(out, config.storage.options())
    state_path = join_uri(path, STATE_FILE)
    if overwrite and fs.exists(path):
        for name in (RUN_NAME, "model", STATE_FILE, "metrics.jsonl", "train_summary.json"):
            target = join_uri(path, name)
            if fs.exists(target):
                fs.rm(target, recursive=True)
    resuming = fs.exists(state_path)
    if resuming:
        with fs.open(state_path, "r") as f:
            previous = json.load(f)
        if previous.get("training_hash") != config.training_hash():
            raise TrainConflictError(
                f"{out} holds a training run with a different model/data/loss/optimiser config "
                f"({previous.get('training_hash')} != {config.training_hash()}); use another OUT or --overwrite")
    else:
        fs.makedirs(path, exist_ok=True)
        with fs.open(state_path, "w") as f:
            json.dump({"training_hash": config.training_hash(), "config": config.public_dict()}, f, indent=1)
    return resuming


def pyarrow_filesystem(uri: str, storage_options):
    """(pyarrow filesystem, path) through fsspec, so S3 options/credentials work as everywhere else."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from vesl.core.storage import filesystem

    fs, path = filesystem(uri, storage_options)
    return PyFileSystem(FSSpecHandler(fs)), path


def build_dataset(uris: list[str], config: TrainConfig, image_size: int, caption_max_tokens: int):
    """Shards -> prepared arrays on Ray Data. Each shard file is read by one task and cast to schema v1
    on the way (files written back by pandas or polars may differ in types and columns)."""
    import ray.data

    from vesl.cloc.data import prepare_batch, read_shard_files

    options = config.storage.options()
    files = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=max(1, min(len(uris), 1024)))
    ds = files.map_batches(read_shard_files, batch_size=1, batch_format="pyarrow",
                           fn_kwargs={"storage_options": options, "batch_rows": config.data.prep_batch_rows})
    ds = ds.map_batches(prepare_batch, batch_size=config.data.prep_batch_rows, batch_format="pyarrow",
                        fn_kwargs=dict(tokenizer=config.model.clip, revision=config.model.revision,
                                       image_size=image_size, caption_max_tokens=caption_max_tokens,
                                       config=config.data, storage_options=options, region_texts=False))
    if config.data.materialize:
        ds = ds.materialize()
    return ds.randomize_block_order(seed=config.run.seed) if config.data.shuffle_buffer_rows else ds


def model_geometry(config: TrainConfig) -> tuple[int, int]:
    """(image size, caption token budget) from the CLIP config, without loading weights."""
    from transformers import CLIPConfig

    clip = CLIPConfig.from_pretrained(config.model.clip, revision=config.model.revision)
    text_max = clip.text_config.max_position_embeddings
    return clip.vision_config.image_size, min(config.data.caption_max_tokens or text_max, text_max)


def plan_steps(rows: int, config: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total steps) for ROWS rows; ValueError when one batch per worker cannot be filled."""
    workers = config.run.num_workers
    per_epoch = (rows // workers) // config.optim.batch_size
    if per_epoch == 0:
        raise ValueError(f"{rows} rows cannot fill one batch of {config.optim.batch_size} per worker "
                         f"for {workers} workers; lower optim.batch_size")
    total_steps = per_epoch * config.optim.epochs
    return per_epoch, min(total_steps, config.optim.max_steps) if config.optim.max_steps else total_steps


def make_trainer(ds, out: str, config: TrainConfig, total_steps: int, use_gpu: bool, bar_on: bool, rows: int = 0):
    """The TorchTrainer: workers run `train_loop`; checkpoints go to OUT/run (local, or S3 through fsspec)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_fs, storage_path = None, out
    if not _local(out):
        storage_fs, storage_path = pyarrow_filesystem(out, config.storage.options())
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config.public_dict() | {"storage": config.storage.model_dump(mode="python")},
                           "total_steps": total_steps, "driver_bar": bar_on, "rows": rows,
                           "metrics_path": str(Path(out) / "metrics.jsonl") if _local(out) else None},
        scaling_config=ray.train.ScalingConfig(num_workers=config.run.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": config.run.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints)),
        datasets={"train": ds},
    )


def publish_final(checkpoint, out: str, options) -> tuple[str, list[dict[str, Any]]]:
    """Copy the final checkpoint to OUT/model; returns its URI and the metrics history it holds."""
    from vesl.cloc.checkpoint import load_metrics
    from vesl.core.storage import filesystem, join_uri

    final = join_uri(out, "model")
    fs, final_path = filesystem(final, options)
    if fs.exists(final_path):
        fs.rm(final_path, recursive=True)
    if _local(out):
        checkpoint.to_directory(final_path)
        return final, load_metrics(final_path)
    local = checkpoint.to_directory()
    history = load_metrics(local)
    fs.put(local, final_path, recursive=True)
    shutil.rmtree(local, ignore_errors=True)
    return final, history


def check_finished(shards: str, options, rows: int, allow_partial: bool) -> None:
    """Refuse SHARDS when it is an annotate OUTPUT whose run (or one of its slices) has not finished, unless
    ALLOW_PARTIAL (then say so): training on part of a dataset without a word is a silent loss."""
    from vesl.core.outdir import completion

    state = completion(shards, options)
    if state is None or state["units_done"] >= state["units"]:
        return
    what = (f"{shards} is an annotate OUTPUT whose run has not finished: {state['units_done']} of {state['units']} "
            f"work units done ({rows} rows so far; the plan has {state['planned_inputs']} inputs)")
    if not allow_partial:
        raise TrainConflictError(f"{what}. Finish it first (re-run its `vesl annotate` command, every slice of it), "
                                 "or pass --allow-partial to train on the units done")
    log.warning("%s: training on what is there (--allow-partial)", what)
    print(f"[vesl train] warning: {what}; training on what is there (--allow-partial)", flush=True)


def worker_stop(error: BaseException):
    """The UnreadableImagesError a training worker stopped with, found in Ray Train's error ERROR (its
    worker_failures, their causes), as a plain exception with the worker's one line; else None."""
    from vesl.cloc.data import UnreadableImagesError
    from vesl.errors import causes

    found = list(causes(error))
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        found += list(causes(failure))
    lines = []
    for e in found:
        if isinstance(e, UnreadableImagesError):
            line = next((a for a in getattr(e, "args", ()) if isinstance(a, str) and "Traceback" not in a), None)
            lines.append(line or str(e).strip().splitlines()[-1])
    # every worker stops with the same counts; the first failures are those of the workers that met them
    lines.sort(key=lambda text: "none recorded" in text)
    return UnreadableImagesError(lines[0]) if lines else None


def run_training(shards: str, out: str, config: TrainConfig, overwrite: bool = False,
                 allow_partial: bool = False) -> dict[str, Any]:
    """Train on SHARDS, checkpointing under OUT/run; the final checkpoint is copied to OUT/model. An
    unfinished annotate OUTPUT is refused unless ALLOW_PARTIAL."""
    import ray

    from vesl.cloc.data import probe_images
    from vesl.core.outdir import count_rows, find_shards
    from vesl.core.ray import init_ray
    from vesl.core.storage import filesystem, join_uri, resolve_output

    options = config.storage.options()
    uris = find_shards(shards, options)
    rows = count_rows(uris, options)
    check_finished(shards, options, rows, allow_partial)
    probe_images(uris, config.data, options)  # before OUT is touched: unreadable images refuse here
    image_size, caption_tokens = model_geometry(config)
    per_epoch, total_steps = plan_steps(rows, config)  # checked before OUT is touched: a refusal leaves it as it was
    out = resolve_output(out, "OUT")  # absolute; a relative one inside `ray job submit` is refused
    resuming = prepare_train_output(out, config, overwrite)
    init_ray(dashboard=True)  # without the state API, Ray Train's cleaner ends the run with a timeout traceback
    use_gpu = config.run.use_gpu if config.run.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    workers = config.run.num_workers
    log.info("training on %d rows in %d shards: %d steps (%d per epoch), %d worker(s)%s", rows, len(uris),
             total_steps, per_epoch, workers, " (resuming)" if resuming else "")
    print(f"[vesl train] {rows} rows in {len(uris)} shard(s), {total_steps} steps of "
          f"{config.optim.batch_size} x {workers} worker(s){', resuming' if resuming else ''}", flush=True)
    ds = build_dataset(uris, config, image_size, caption_tokens)
    # Ray Data's bars would restart on every epoch's pass through the data: the trainer's own lines say more
    ray.data.DataContext.get_current().enable_progress_bars = False
    # a terminal and a local OUT: a step bar drawn here from the live metrics file; else progress lines
    bar_on = sys.stdout.isatty() and _local(out)
    trainer = make_trainer(ds, out, config, total_steps, use_gpu, bar_on, rows)
    started = time.perf_counter()
    with MetricsBar(Path(out) / "metrics.jsonl" if bar_on else None, total_steps):
        try:
            result = trainer.fit()
        except Exception as e:
            stop = worker_stop(e)
            if stop is None:
                raise
            raise stop from None  # a worker's own stop, as its one line
    if result.error:
        stop = worker_stop(result.error)
        raise stop or result.error
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    final, history = publish_final(result.checkpoint, out, options)
    summary = {"rows": rows, "shards": len(uris), "steps": (history[-1]["step"] if history else None),
               "planned_steps": total_steps, "workers": workers, "use_gpu": use_gpu, "resumed": resuming,
               "wall_s": round(time.perf_counter() - started, 1), "final": history[-1] if history else None,
               "model": final}
    fs, root = filesystem(out, options)
    with fs.open(join_uri(root, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
