"""From shards to training arrays: discovery, version check, padding/masking, bad rows, sampling."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas.region_text import SchemaVersionError, region_text_schema
from vesl.cloc.data import DataConfig, iter_prepared, prepare_batch, sample_regions, text_key
from vesl.cloc.synthetic import CLASSES, write_shapes_dataset
from vesl.core.outdir import find_shards


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root / "embedded", 24, seed=3, shard_rows=10)
    write_shapes_dataset(root / "by_uri", 24, seed=3, shard_rows=10, embed_images=False)
    return root


def _prepare(table, tiny_dir, **kw):
    config = DataConfig(**kw)
    return prepare_batch(table, tokenizer=str(tiny_dir / "clip"), revision=None, image_size=64,
                         caption_max_tokens=24, config=config)


def test_synthetic_rows_follow_schema_v1(shapes):
    files = find_shards(str(shapes / "embedded"))
    assert len(files) == 3  # 24 rows in shards of 10, found under data/
    table = pq.read_table(files[0])
    assert table.schema.equals(region_text_schema(), check_metadata=False)
    rows = table.to_pylist()
    assert all(2 <= len(r["regions"]) <= 4 and r["caption"].startswith("a ") for r in rows)
    assert {g["phrase"] for r in rows for g in r["regions"]} <= set(CLASSES)
    assert json.loads((shapes / "embedded" / "classes.json").read_text()) == CLASSES


def test_find_shards_refuses_unknown_versions_and_missing_data(tmp_path):
    bad = tmp_path / "v2"
    bad.mkdir()
    schema = region_text_schema({"vesl.schema_version": "2.0"})
    pq.write_table(pa.Table.from_pylist([], schema=schema), bad / "x.parquet")
    with pytest.raises(SchemaVersionError, match="2.0"):
        find_shards(str(bad))
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(SchemaVersionError, match="not a vesl"):
        find_shards(str(plain))
    with pytest.raises(FileNotFoundError):
        find_shards(str(tmp_path / "nothing-here"))


def test_prepare_batch_shapes_padding_and_keys(shapes, tiny_dir):
    table = pq.read_table(find_shards(str(shapes / "embedded"))[0])
    out = _prepare(table, tiny_dir, max_regions=6, phrase_max_tokens=8)
    n = table.num_rows
    assert out["pixels"].shape == (n, 64, 64, 3) and out["pixels"].dtype == np.uint8
    assert out["input_ids"].shape == (n, 24)
    assert out["region_boxes"].shape == (n, 6, 4) and out["phrase_ids"].shape == (n, 6, 8)
    counts = [len(r) for r in table.column("regions").to_pylist()]
    assert out["region_valid"].sum(axis=1).tolist() == counts
    assert out["ok"].all()
    first = table.column("regions").to_pylist()[0]
    assert np.allclose(out["region_boxes"][0, :len(first)], [g["box"] for g in first])
    # padding slots are empty: no box, no phrase
    assert not out["region_boxes"][0, len(first):].any() and (out["region_phrases"][0, len(first):] == "").all()
    # identical phrases share a key, different ones do not
    keys = {p: k for p, k in zip(out["region_phrases"][out["region_valid"]], out["region_keys"][out["region_valid"]])}
    assert all(text_key(p) == k for p, k in keys.items())
    assert len(set(keys.values())) == len(keys)


def test_max_regions_keeps_the_highest_scores(tiny_dir):
    from PIL import Image

    from tests.conftest import encode

    regions = [{"box": [0.1 * i, 0.0, 0.1 * i + 0.05, 0.5], "phrase": f"thing {i}", "score": s, "source": "caption"}
               for i, s in enumerate([0.2, 0.9, 0.5, 0.7])]
    row = {"image_id": "a", "image_uri": None, "image_bytes": encode(Image.new("RGB", (40, 30), "red"), "PNG"),
           "width": 40, "height": 30, "alt_text": None, "caption": "x", "phrases": [], "regions": regions}
    out = _prepare(pa.Table.from_pylist([row], schema=region_text_schema()), tiny_dir, max_regions=2)
    assert list(out["region_phrases"][0]) == ["thing 1", "thing 3"]
    assert (out["pixels"][0] == [255, 0, 0]).all()  # stretched to the square, colour kept


def test_images_by_uri_equal_embedded_images(shapes, tiny_dir):
    config = DataConfig()
    kw = dict(tokenizer=str(tiny_dir / "clip"), revision=None, image_size=64, caption_max_tokens=24, config=config)
    embedded = list(iter_prepared(find_shards(str(shapes / "embedded")), **kw))
    by_uri = list(iter_prepared(find_shards(str(shapes / "by_uri")), **kw))
    assert sum(len(b["ok"]) for b in by_uri) == 24
    for a, b in zip(embedded, by_uri):
        assert np.array_equal(a["pixels"], b["pixels"]) and np.array_equal(a["region_boxes"], b["region_boxes"])


def test_a_bad_image_is_flagged_not_raised(shapes, tiny_dir, tmp_path):
    table = pq.read_table(find_shards(str(shapes / "embedded"))[0]).slice(0, 3).to_pylist()
    table[0]["image_bytes"] = b"not an image"
    table[1]["image_bytes"] = None
    table[1]["image_uri"] = str(tmp_path / "missing.png")
    out = _prepare(pa.Table.from_pylist(table, schema=region_text_schema()), tiny_dir)
    assert out["ok"].tolist() == [False, False, True]
    assert out["skip_reason"][0].startswith("not_an_image") and out["skip_reason"][1].startswith("not_found")
    assert not out["region_valid"][:2].any()  # a skipped row contributes no regions


def test_sample_regions_draws_up_to_m_valid_regions_per_image():
    valid = torch.tensor([[True, True, True, True, True, True, False, False],
                          [True, False, True, False, False, False, False, False],
                          [False] * 8])
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        image_index, slot = sample_regions(valid, 4, generator)
        assert (image_index == 0).sum() == 4 and (image_index == 1).sum() == 2 and (image_index == 2).sum() == 0
        assert valid[image_index, slot].all()
        pairs = list(zip(image_index.tolist(), slot.tolist()))
        assert len(set(pairs)) == len(pairs)  # without replacement
        seen.update(s for i, s in pairs if i == 0)
    assert seen == {0, 1, 2, 3, 4, 5}  # every valid region of image 0 gets drawn over the steps
