"""The stage contract and the ordered registry: the chain of columns holds, every reject reason is
declared and documented, and a new stage is one file plus one registry line."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from operators import registry
from operators.base import SECONDS_PREFIX, Reject, Stage
from schemas.columns import READER_COLUMNS
from schemas.rejects import RejectReason
from tests.conftest import REPO
from tests.operators.upper_stage import UpperCaseCaption, UpperConfig


def test_every_column_a_stage_reads_is_written_by_the_reader_or_an_earlier_stage():
    registry.check_chain()
    available = set(READER_COLUMNS)
    for stage in registry.stages():
        assert set(stage.reads) <= available, stage.name
        available |= set(stage.writes)


def test_a_chain_out_of_order_is_refused_naming_the_column():
    decode, caption, fuse, phrases, detect = registry.stages()
    with pytest.raises(ValueError, match=r"'detect' reads \['phrases', 'phrase_sources', 'phrase_spans'\]"):
        registry.check_chain((decode, caption, fuse, detect, phrases))
    with pytest.raises(ValueError, match=r"'fuse' reads \['caption', 'vlm_caption', 'caption_source'\]"):
        registry.check_chain((decode, fuse, caption, phrases, detect))
    with pytest.raises(ValueError, match="no stage writes the shard column"):
        registry.check_chain((decode, caption, phrases))  # nothing writes `regions`
    registry.check_chain((decode, caption, phrases, detect))  # fusion is optional


def test_every_stage_declares_its_reasons_and_its_fallback_reason():
    for stage in registry.stages():
        assert stage.reasons and all(isinstance(r, RejectReason) for r in stage.reasons), stage.name
        assert stage.error_reason in stage.reasons, stage.name


def test_the_decoded_pixels_leave_with_the_last_stage_that_reads_them():
    drops = registry.drops_after()
    assert "pixels" in drops["detect"] and not any("pixels" in d for name, d in drops.items() if name != "detect")
    assert not (set(drops["detect"]) & {"image_id", "caption", "regions", "width", "height"})


def test_the_reject_reasons_page_lists_every_reason_with_its_stage():
    rows = [line.split("|")[1:3] for line in (REPO / "docs" / "rejects.md").read_text().splitlines()
            if line.startswith("| `")]
    listed = {(stage.strip(" `"), reason.strip(" `")) for stage, reason in rows}
    declared = {(stage.name, r.value) for stage in registry.stages() for r in stage.reasons}
    read_reasons = {r.value for r in RejectReason} - {r.value for s in registry.stages() for r in s.reasons}
    declared |= {("read", r) for r in read_reasons}
    missing = sorted(declared - listed)
    assert not missing, f"docs/rejects.md does not list (stage, reason) {missing}"


def test_a_stage_rejecting_with_an_undeclared_reason_costs_that_row_not_the_batch():
    class Sloppy(UpperCaseCaption):
        name = "sloppy"

        def process(self, batch):
            return [Reject(RejectReason.TOO_SMALL, "not mine to say") if c == "two" else {"caption": "x"}
                    for c in batch.column("caption").to_pylist()]

    out = Sloppy()(pa.table({"image_id": ["a", "b"], "caption": ["one", "two"]}))
    assert out.column("caption").to_pylist() == ["x", None]
    assert out.column("reject_reason").to_pylist() == [None, "model_error"]
    assert "does not declare" in out.column("reject_message")[1].as_py()


def test_the_base_isolates_rows_skips_rejected_ones_and_times_the_stage(caplog):
    calls = []

    class Fussy(UpperCaseCaption):
        name = "fussy"

        def process(self, batch):
            captions = batch.column("caption").to_pylist()
            calls.append(captions)
            if "boom" in captions:
                raise RuntimeError("boom breaks the model")
            return super().process(batch)

    stage = Fussy(UpperConfig(batch_size=2))
    caplog.set_level("DEBUG", logger="vesl.stage")
    out = stage(pa.table({"image_id": ["a", "b", "c", "d"], "caption": ["a cat", "a dog", "boom", "an owl"],
                          "reject_stage": ["read", None, None, None], "reject_reason": ["duplicate", None, None, None],
                          "reject_message": ["x", None, None, None]}))
    # row 0 was rejected before; the chunk of rows 1 and 2 is retried row by row
    assert calls == [["a dog", "boom"], ["a dog"], ["boom"], ["an owl"]]
    assert out.column("caption").to_pylist() == [None, "A DOG", None, "AN OWL"]
    assert out.column("reject_reason").to_pylist() == ["duplicate", None, "model_error", None]
    assert out.column("reject_stage").to_pylist() == ["read", None, "fussy", None]
    assert re.match(r"stage fussy: 4 rows \(3 pending, 1 rejected here\) in \d+\.\d{3} s", caplog.messages[-1])
    seconds = out.column(SECONDS_PREFIX + "fussy").to_pylist()  # the stage's time, per row it handled
    assert seconds[0] is None and all(s is not None and s > 0 for s in seconds[1:])


def test_a_stage_sees_only_the_columns_it_reads():
    seen = []

    class Nosy(UpperCaseCaption):
        name = "nosy"

        def process(self, batch):
            seen.append(batch.column_names)
            batch.column("alt_text")  # not in `reads`: not there (a KeyError, so the row is rejected)
            return super().process(batch)

    table = pa.table({"image_id": ["a", "b"], "caption": ["a cat", "a dog"], "alt_text": ["Tom", "Rex"],
                      "pixels": [b"\x00" * 3, b"\x00" * 3]})
    out = Nosy()(table)
    assert seen and all(columns == ["caption"] for columns in seen)  # exactly `reads`, nothing else
    assert out.column("reject_reason").to_pylist() == ["model_error", "model_error"]
    assert "alt_text" in out.column("reject_message")[0].as_py()
    assert out.column("alt_text").to_pylist() == ["Tom", "Rex"]  # the batch itself keeps every column


@pytest.fixture
def with_upper(monkeypatch):
    """The one registry line: the upper-casing stage after the captions are final (before the phrases)."""
    chain = list(registry.STAGES)
    chain.insert(chain.index(next(s for s in chain if s.name == "phrases")), UpperCaseCaption)
    monkeypatch.setattr(registry, "STAGES", chain)
    return chain


def test_a_new_stage_gets_config_pools_funnel_and_label_hash_with_no_other_edit(with_upper):
    from vesl.annotate.config import load_config
    from vesl.annotate.pools import plan_pools

    registry.check_chain()
    config = load_config(overrides=["upper.refuse=sofa", "ray.pools.upper.size=2"])
    assert list(type(config).model_fields)[2:8] == ["decode", "caption", "fuse", "upper", "phrases", "detect"]
    assert config.upper == UpperConfig(refuse="sofa") and config.ray.pools.upper.size == 2
    assert registry.funnel_steps() == ["read", "decode", "caption", "fuse", "upper", "phrases", "detect"]
    pools = plan_pools(8, 0, config)
    assert pools["upper"].actor and pools["upper"].size == 2 and pools["upper"].num_gpus == 0
    assert load_config().label_hash() != config.label_hash()  # its settings label the output
    assert load_config(overrides=["upper.batch_size=7"]).label_hash() == load_config().label_hash()  # speed only
    with pytest.raises(ValueError, match="upper"):
        load_config(overrides=["upper.no_such_key=1"])


@pytest.mark.slow
def test_a_config_pickles_with_its_own_stages_not_the_registry_s_at_import(with_upper):
    """Ray ships the config to its workers with cloudpickle: in another process, whose registry is the one at
    import, a config made for a chain registered later arrives with that chain."""
    import subprocess
    import sys

    from ray import cloudpickle

    from vesl.annotate.config import load_config

    config = load_config(overrides=["upper.refuse=sofa", "detect.threshold=0.3"])
    unpickle = ("import pickle, sys; c = pickle.loads(sys.stdin.buffer.read()); "
                "print([s.name for s in c.active_stages()], c.upper.refuse, c.detect.threshold, c.label_hash())")
    done = subprocess.run([sys.executable, "-c", unpickle], input=cloudpickle.dumps(config), cwd=REPO,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == ["['decode',", "'caption',", "'fuse',", "'upper',", "'phrases',",
                                            "'detect']", "sofa", "0.3", config.label_hash()]


@pytest.mark.slow
def test_a_new_stage_runs_in_the_annotate_job_with_no_other_edit(with_upper, tmp_path, tiny_dir, ray_local):
    """The real job on the sample: the wiring puts the stage before the phrases in an actor pool of its
    own, its rejects are accounted, and the funnel and the manifest's pools list it."""
    from tests.conftest import SAMPLE
    from tests.pipelines.helpers import read_output
    from vesl.annotate.config import load_config
    from vesl.annotate.job import run_annotate

    config = load_config(preset_name="tiny", overrides=["upper.refuse=__never__"])
    manifest = run_annotate(str(SAMPLE / "manifest.jsonl"), str(tmp_path / "out"), config)
    rows, rejects, _ = read_output(tmp_path / "out")
    assert len(rows) == 6 and rejects.empty
    assert all(c == c.upper() and re.search("[A-Z]", c) for c in rows["caption"])
    assert all(p == p.lower() for phrases in rows["phrases"] for p in phrases)  # phrases lower-case, as always
    assert [s["stage"] for s in manifest["counts"]["funnel"]] == registry.funnel_steps()
    assert manifest["resources"]["pools"]["upper"]["actor"] is True
    assert manifest["config"]["upper"] == {"batch_size": 64, "refuse": "__never__"}
    assert manifest["counts"]["accounted"]


def test_stage_is_the_base_of_every_registered_stage():
    assert all(issubclass(s, Stage) for s in registry.stages())
