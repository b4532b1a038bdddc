"""Images the trainer cannot read: a batch with none is skipped and counted, never a crash; too many stop
training with one line (the first failures and the fix), exit 5, before OUT is touched when the probe sees
it, and with no model or summary half-written when it shows only during training."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from vesl.cloc.config import load_train_config
from vesl.cloc.data import DataConfig, UnreadableImagesError, probe_images
from vesl.cloc.synthetic import write_shapes_dataset
from vesl.core.outdir import find_shards


def _shapes(root, images=40, shard_rows=8):
    """Shards whose images are PNG files beside them (located, not embedded)."""
    write_shapes_dataset(root, images, seed=3, shard_rows=shard_rows, embed_images=False)
    return root


def _break(root, shards: list[int]) -> list[str]:
    """Delete the image files of the given shards; returns their image ids."""
    gone = []
    for index in shards:
        table = pq.read_table(root / "data" / f"shard-{index:05d}.parquet", columns=["image_id", "image_location"])
        for image_id, location in zip(*table.to_pydict().values()):
            (root / "images" / location.rsplit("/", 1)[1]).unlink()
            gone.append(image_id)
    return gone


def _config(*overrides):
    return load_train_config(None, "tiny", ["optim.batch_size=8", "optim.epochs=1", "optim.warmup_steps=1",
                                            "data.prep_batch_rows=8", "data.shuffle_buffer_rows=0",
                                            "run.log_every_steps=1", *overrides])


def test_the_probe_refuses_most_unreadable_and_passes_a_few(tmp_path):
    root = _shapes(tmp_path / "shapes")
    gone = _break(root, [0, 1, 2, 3])  # 32 of 40
    uris = find_shards(str(root))
    with pytest.raises(UnreadableImagesError) as caught:
        probe_images(uris, DataConfig(), None)
    line = str(caught.value)
    assert "\n" not in line and "images probed before training" in line
    assert "decode.embed_images: true" in line and "--relocate" in line
    assert any(image_id in line for image_id in gone) and "no such file" in line
    assert probe_images(uris, DataConfig(max_unreadable_share=0.9), None)["failed"] > 20
    assert probe_images(uris, DataConfig(probe_images=0), None) == {"probed": 0, "failed": 0}


def test_relocate_reads_a_moved_input_from_its_new_place(tmp_path):
    root = _shapes(tmp_path / "shapes")
    uris = find_shards(str(root))
    (root / "images").rename(tmp_path / "moved")
    with pytest.raises(UnreadableImagesError):
        probe_images(uris, DataConfig(), None)
    moved = DataConfig(relocate={str((root / "images").resolve()): str(tmp_path / "moved"), "/elsewhere/": "/nowhere/"})
    assert probe_images(uris, moved, None)["failed"] == 0


def test_a_batch_without_one_readable_image_is_skipped_and_counted(tiny_dir, ray_local, tmp_path):
    from vesl.cloc.train import run_training

    root = _shapes(tmp_path / "shapes")
    _break(root, [2])  # one shard = one batch of 8, every image gone
    out = tmp_path / "train"
    summary = run_training(str(root), str(out), _config("data.max_unreadable_share=0.5"))
    assert summary["steps"] == 4 and summary["planned_steps"] == 5  # 5 batches, 1 skipped
    assert summary["final"]["batches_skipped"] == 1 and summary["final"]["rows_skipped"] == 8
    assert (out / "model" / "cloc.json").exists()


def test_most_images_unreadable_stops_with_one_line_and_nothing_half_written(tiny_dir, ray_local, tmp_path, capfd):
    from vesl.cloc.job import main

    root = _shapes(tmp_path / "shapes")
    gone = _break(root, [1, 2, 3, 4])  # 32 of 40
    refused = tmp_path / "refused"
    assert main([str(root), str(refused), "--preset", "tiny", "--set", "optim.batch_size=8"]) == 5
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("vesl train: error:"))
    assert "have no readable image" in line and "decode.embed_images: true" in line
    assert not refused.exists()  # refused before OUT was touched

    # the probe off: the stop comes from the workers, before any checkpoint, as the same one line
    stopped = tmp_path / "stopped"
    args = [str(root), str(stopped), "--preset", "tiny", "--set", "optim.batch_size=8", "--set", "data.probe_images=0",
            "--set", "data.shuffle_buffer_rows=0", "--set", "data.prep_batch_rows=8",
            "--set", "run.checkpoint_every_steps=100"]
    assert main(args) == 5
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("vesl train: error:"))
    assert "rows read so far have no readable image" in line and "Traceback" not in line
    assert any(image_id in line for image_id in gone)
    assert not (stopped / "model").exists() and not (stopped / "train_summary.json").exists()
    assert not list((stopped / "run").glob("checkpoint_*"))
    state = json.loads((stopped / "_vesl_train.json").read_text())
    assert state["training_hash"]  # a complete claim of OUT: a re-run after the fix trains from the start


def test_under_ddp_a_batch_one_worker_cannot_read_is_skipped_by_both(tiny_dir, ray_local, tmp_path):
    """Two workers: when one worker's batch has no readable image, both skip that step (DDP would otherwise
    wait for ever for the worker that did not step); the counts are summed over the workers."""
    from vesl.cloc.train import run_training

    root = _shapes(tmp_path / "shapes", images=48)
    _break(root, [1, 4])  # 16 of 48: two blocks of 8, wherever the split puts them
    summary = run_training(str(root), str(tmp_path / "train"),
                           _config("data.max_unreadable_share=0.5", "run.num_workers=2"))
    final = summary["final"]
    assert final["rows_skipped"] == 16 and final["batches_skipped"] in (1, 2)
    assert summary["steps"] + final["batches_skipped"] == summary["planned_steps"] == 3
