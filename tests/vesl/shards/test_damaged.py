"""Readers of an OUTPUT name the file they fail on (inspect, read_regions, train), and training refuses an
OUTPUT whose run has not finished unless told it may."""

from __future__ import annotations

import json

import pytest

import vesl
from tests.vesl.shards.test_inspect import write_known_output
from vesl.errors import UnreadableFileError


def garbage_of_the_same_size(path) -> None:
    path.write_bytes(b"\x00" * path.stat().st_size)


def damage_a_page(path) -> None:
    """Keep the footer (the file still opens), break the data in the middle."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle:middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [garbage_of_the_same_size, damage_a_page])
def test_a_damaged_shard_is_named_by_every_reader(tmp_path, capsys, damage):
    from vesl.shards.inspect import main as inspect_main

    out = write_known_output(tmp_path / "out")
    shard = out / "data" / "part-2.parquet"
    damage(shard)
    with pytest.raises(UnreadableFileError) as e:
        vesl.read_regions(str(out), explode=False)
    assert str(shard) in str(e.value) and "a shard" in str(e.value)
    assert inspect_main([str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vesl inspect: error: ") and str(shard) in err and "Traceback" not in err


def test_a_damaged_rejects_file_is_named(tmp_path, capsys):
    from vesl.shards.inspect import main as inspect_main

    out = write_known_output(tmp_path / "out")
    garbage_of_the_same_size(out / "rejects" / "part-1.parquet")
    assert inspect_main([str(out)]) == 2
    rejects = out / "rejects" / "part-1.parquet"
    assert f"{rejects} (a rejects file) is not a readable Parquet file" in capsys.readouterr().err


def unfinished(out, done: int, units: int) -> None:
    """Make OUT an annotate OUTPUT whose plan has UNITS units, DONE of them committed."""
    (out / "_vesl" / "plan").mkdir(parents=True)
    (out / "_vesl" / "units").mkdir(parents=True)
    (out / "_vesl" / "plan" / "plan.json").write_text(json.dumps({"units": units, "inputs": 4 * units}))
    for unit in range(done):
        (out / "_vesl" / "units" / f"{unit:09d}.json").write_text("{}")


def test_training_refuses_an_unfinished_output_unless_allowed(tmp_path, tiny_dir, capsys):
    from vesl.cloc.job import main as train_main
    from vesl.cloc.train import check_finished

    out = write_known_output(tmp_path / "out")
    unfinished(out, done=1, units=2)  # one slice of two has finished
    assert train_main([str(out), str(tmp_path / "train"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"{out} is an annotate OUTPUT whose run has not finished: 1 of 2 work units done (5 rows so far" in err
    assert "--allow-partial" in err and not (tmp_path / "train").exists()  # refused before OUT is touched
    check_finished(str(out), None, rows=5, allow_partial=True)  # allowed: said, not refused
    assert "warning: " in capsys.readouterr().out
    (out / "_vesl" / "units" / "000000001.json").write_text("{}")
    check_finished(str(out), None, rows=5, allow_partial=False)  # finished: nothing to say
    assert capsys.readouterr().out == ""


def test_a_damaged_shard_stops_training_before_it_starts(tmp_path, tiny_dir, capsys):
    from vesl.cloc.job import main as train_main

    out = write_known_output(tmp_path / "out")
    garbage_of_the_same_size(out / "data" / "part-1.parquet")
    assert train_main([str(out), str(tmp_path / "train"), "--preset", "tiny"]) == 2
    assert f"{out / 'data' / 'part-1.parquet'} (a shard) is not a readable Parquet file" in capsys.readouterr().err
