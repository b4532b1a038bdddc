"""A short Ray Train run on CPU: two DDP workers, checkpoints, metrics, resume, refusal of a changed config."""

import json
import math

import pytest

from vesl.cloc.config import load_train_config
from vesl.cloc.synthetic import write_shapes_dataset
from vesl.cloc.train import TrainConflictError, make_scheduler, run_training


def _lrs(schedule, steps):
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, 4, 20, schedule)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = _lrs("cosine", 21)
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert lrs[12] == pytest.approx(0.5) and lrs[20] == pytest.approx(0.0, abs=1e-12)
    assert _lrs("constant", 20)[4:] == [1.0] * 16


def _config(*overrides):
    return load_train_config(None, "tiny", ["optim.batch_size=16", "optim.warmup_steps=2", "run.log_every_steps=2",
                                            "run.checkpoint_every_steps=2", *overrides])


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ray_train_two_workers_checkpoint_and_resume(tiny_dir, ray_local, tmp_path):
    from vesl.cloc.checkpoint import load_cloc

    shards = tmp_path / "shapes"
    write_shapes_dataset(shards, 96, seed=5, shard_rows=40)
    out = tmp_path / "train"
    summary = run_training(str(shards), str(out), _config("optim.max_steps=4", "run.num_workers=2"))
    assert summary["steps"] == 4 and summary["workers"] == 2 and not summary["resumed"]
    records = _metrics(out)
    assert [r["step"] for r in records] == [2, 4]
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "clip", "cloc", "grounding"))
    model, meta = load_cloc(out / "model")
    assert meta["step"] == 4
    checkpoints = sorted(p.name for p in (out / "run").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # steps 2 and 4 (keep_checkpoints = 2)

    # the same OUT again, one worker and a longer budget: resumes at step 4, does 4 more
    summary = run_training(str(shards), str(out), _config("optim.max_steps=8", "run.num_workers=1"))
    assert summary["resumed"] and summary["steps"] == 8
    assert [r["step"] for r in _metrics(out)] == [2, 4, 6, 8]
    assert load_cloc(out / "model")[1]["step"] == 8

    # `vesl eval` on the result: JSON with mAcc and recall, for the Prompter and the RoI baseline
    import io
    from contextlib import redirect_stdout

    from vesl.cli import main as cli

    for extra in ([], ["--baseline"]):
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert cli(["eval", str(shards), "--checkpoint", str(out), "--classes", str(shards / "classes.json"),
                        *extra]) == 0
        result = json.loads(buf.getvalue())
        assert result["mode"] == ("roi_pool" if extra else "prompter") and result["step"] == 8
        assert result["images"] == 96 and result["regions"] == result["regions_with_class"] > 96
        assert result["chance_mAcc"] == pytest.approx(1 / 12) and 0 <= result["mAcc"] <= 1
        assert set(result["region_to_text"]) == {"R@1", "R@10"} and set(result["text_to_region"]) == {"R@1", "R@10"}
        assert ("grounding" in result) == (not extra)  # the grounding head's boxes: Prompter mode only
        if not extra:
            assert 0 <= result["grounding"]["mean_iou"] <= 1

    # a different loss is a different run: refused before anything is touched
    with pytest.raises(TrainConflictError, match="different"):
        run_training(str(shards), str(out), _config("optim.max_steps=8", "loss.region_weight=0"))
    assert [r["step"] for r in _metrics(out)] == [2, 4, 6, 8]


def test_lambda_zero_trains_plain_clip_under_ddp(tiny_dir, ray_local, tmp_path):
    """lambda = 0: the Prompter gets no gradient; DDP must still run (unused parameters allowed)."""
    from safetensors.torch import load_file

    shards = tmp_path / "shapes"
    write_shapes_dataset(shards, 64, seed=6, shard_rows=64)
    out = tmp_path / "clip-only"
    summary = run_training(str(shards), str(out), _config("optim.max_steps=2", "run.num_workers=2",
                                                          "loss.region_weight=0"))
    assert summary["steps"] == 2
    record = _metrics(out)[-1]
    assert "cloc" not in record and record["loss"] == pytest.approx(record["clip"])
    assert load_file(str(out / "model" / "cloc.safetensors"))  # the (untrained) Prompter is still saved


def _rewrite_shard(path, tool, keep_regions):
    """PATH as TOOL writes it back after a read (no vesl footer, pandas/polars types), regions dropped
    unless KEEP_REGIONS."""
    import pandas as pd
    import pyarrow.parquet as pq

    df = pd.read_parquet(path)
    if not keep_regions:
        df["regions"] = [[] for _ in range(len(df))]
    if tool == "pandas":
        df.to_parquet(path)
    else:
        import polars as pl

        pl.from_pandas(df).write_parquet(path)
    assert b"vesl.schema_version" not in (pq.read_schema(path).metadata or {})


def test_training_on_pandas_and_polars_shards_with_and_without_regions(tiny_dir, ray_local, tmp_path):
    shards = tmp_path / "shapes"
    write_shapes_dataset(shards, 64, seed=7, shard_rows=32)
    first, second = sorted((shards / "data").glob("*.parquet"))
    _rewrite_shard(first, "pandas", keep_regions=False)  # 32 rows without regions
    _rewrite_shard(second, "polars", keep_regions=True)
    out = tmp_path / "mixed"
    summary = run_training(str(shards), str(out), _config("optim.max_steps=4", "run.num_workers=1"))
    assert summary["steps"] == 4 and summary["rows"] == 64
    records = _metrics(out)
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "clip", "cloc", "grounding"))

    # every row without regions: every batch trains on L_CLIP alone, under DDP with two workers
    _rewrite_shard(second, "polars", keep_regions=False)
    out = tmp_path / "none"
    summary = run_training(str(shards), str(out), _config("optim.max_steps=2", "run.num_workers=2"))
    assert summary["steps"] == 2
    for record in _metrics(out):
        assert record["cloc"] == 0.0 and record["grounding"] == 0.0
        assert record["loss"] == pytest.approx(record["clip"]) and record["clip"] > 0


def _tree(path):
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def test_a_refused_batch_size_leaves_out_as_it_was(tiny_dir, tmp_path):
    shards = tmp_path / "shapes"
    write_shapes_dataset(shards, 40, seed=8, shard_rows=40)
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="40 rows cannot fill one batch of 64"):
        run_training(str(shards), str(fresh), _config("optim.batch_size=64"))
    assert not fresh.exists()
    used = tmp_path / "used"  # an OUT holding an earlier run (here only its state file and a metrics line)
    used.mkdir()
    (used / "_vesl_train.json").write_text('{"training_hash": "other"}')
    (used / "metrics.jsonl").write_text('{"step": 2}\n')
    before = _tree(used)
    with pytest.raises(ValueError, match="lower optim.batch_size"):
        run_training(str(shards), str(used), _config("optim.batch_size=64"))
    assert _tree(used) == before
