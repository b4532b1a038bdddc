import pytest
from pydantic import ValidationError

from vesl.annotate.config import AnnotateConfig, load_config
from vesl.core.settings import parse_override


def test_defaults_are_the_real_models_and_the_papers_threshold():
    config = AnnotateConfig()
    assert config.detect.model == "google/owlv2-base-patch16-ensemble"
    assert config.detect.threshold == 0.1 and config.detect.nms_iou is None and config.detect.top_k is None
    assert config.phrases.max_phrases == 20
    assert config.caption.trust_remote_code is False and config.detect.trust_remote_code is False


def test_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("detect:\n  threshold: 0.3\n  top_k: 5\nphrases:\n  include_entities: true\n")
    config = load_config(str(path), overrides=["detect.threshold=0.25", "output.on_existing=overwrite"])
    assert config.detect.threshold == 0.25 and config.detect.top_k == 5
    assert config.phrases.include_entities and config.output.on_existing == "overwrite"


def test_unknown_keys_and_bad_values_are_refused():
    with pytest.raises(ValidationError, match="threshhold"):
        load_config(overrides=["detect.threshhold=0.2"])
    with pytest.raises(ValidationError):
        load_config(overrides=["detect.threshold=2"])
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("detect.threshold")


def test_tiny_preset_points_at_local_models(tiny_dir):
    config = load_config(preset_name="tiny")
    assert config.caption.model == str(tiny_dir / "captioner")
    assert config.detect.model == str(tiny_dir / "detector")


def test_secrets_never_reach_the_public_config():
    config = load_config(overrides=["storage.key=AKIAEXAMPLE", "storage.secret=supersecretvalue"])
    text = str(config.public_dict()) + repr(config) + str(config)
    assert "supersecretvalue" not in text and "AKIAEXAMPLE" not in text
    assert config.storage.options()["s3"]["secret"] == "supersecretvalue"


def test_label_hash_ignores_paths_resources_and_secrets_but_not_thresholds():
    base = AnnotateConfig().label_hash()
    assert load_config(overrides=["storage.secret=x", "ray.no_progress_timeout_s=5"]).label_hash() == base
    assert load_config(overrides=["detect.threshold=0.2"]).label_hash() != base
    assert load_config(overrides=["detect.batch_size=64", "caption.device=cuda:1"]).label_hash() == base
    assert load_config(overrides=["caption.dtype=bfloat16"]).label_hash() != base


def test_presets_ship_as_yaml_and_the_paper_recipe_is_the_default(tiny_dir):
    from vesl.annotate.config import preset_names

    assert preset_names() == ["alt-ngram", "fast", "paper", "paper-served", "tiny"]
    default = load_config()
    assert load_config(preset_name="paper") == default
    assert default.caption.prompt_style == "chat" and default.fuse.enabled and default.caption.mode == "model"
    fast = load_config(preset_name="fast")
    assert fast.caption.model == "Salesforce/blip-image-captioning-large" and not fast.fuse.enabled
    ngram = load_config(preset_name="alt-ngram")
    assert ngram.caption.mode == "alt_text" and not ngram.phrases.use_caption
    assert [s.name for s in ngram.active_stages()] == ["decode", "caption", "phrases", "detect"]
    tiny = load_config(preset_name="tiny")
    assert tiny.fuse.model == str(tiny_dir / "fuser") and tiny.caption.model == str(tiny_dir / "captioner")
    served = load_config(preset_name="paper-served")  # the paper's models and prompts, on inference servers
    assert (served.caption.backend, served.fuse.backend) == ("openai", "openai")
    assert (served.caption.model, served.fuse.model, served.caption.prompt) == (
        default.caption.model, default.fuse.model, default.caption.prompt)
    assert served.detect == default.detect and served.phrases == default.phrases
    assert len({c.label_hash() for c in (default, fast, ngram, tiny, served)}) == 5
    sooner = load_config(preset_name="paper-served", overrides=["caption.backoff_s=0.25", "fuse.max_retries=2"])
    assert sooner.label_hash() == served.label_hash()  # how soon and how often a request is retried: speed
    assert (sooner.caption.client("caption").backoff_s, served.caption.client("caption").backoff_s) == (0.25, 1.0)
    with pytest.raises(ValueError, match="unknown preset 'nope'; known: alt-ngram, fast, paper, paper-served, tiny"):
        load_config(preset_name="nope")


def test_vesl_config_prints_a_preset(capsys):
    import yaml

    from vesl.cli import main

    assert main(["config", "--preset", "alt-ngram"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["caption"]["mode"] == "alt_text" and shown["fuse"]["enabled"] is False


def test_renamed_settings_and_flags_answer_with_their_new_name(capsys):
    from vesl.annotate.job import main

    with pytest.raises(ValueError, match="output.rows_per_shard is now output.rows_per_part"):
        load_config(overrides=["output.rows_per_shard=500"])
    assert load_config(overrides=["output.rows_per_part=500"]).output.rows_per_part == 500
    assert main(["in.jsonl", "out", "--shard", "1/2"]) == 2
    assert capsys.readouterr().err.strip() == "vesl annotate: error: --shard is now --slice: use --slice 1/2"
