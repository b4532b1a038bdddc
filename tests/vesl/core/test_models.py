"""Safe loading: safetensors only, no remote code unless the config allows it."""

import json
import shutil

import pytest
import torch

from operators.caption import CaptionConfig, CaptionImages
from operators.detect import DetectConfig
from vesl.annotate.config import AnnotateConfig
from vesl.annotate.job import model_provenance
from vesl.core.models import load_pretrained


def test_pickle_weights_are_refused(tiny_dir, tmp_path):
    from transformers import Owlv2ForObjectDetection

    model = Owlv2ForObjectDetection.from_pretrained(tiny_dir / "detector")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir / "detector", pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # a pickle: can run code when loaded
    with pytest.raises(OSError, match="safetensors"):
        load_pretrained(Owlv2ForObjectDetection, str(pickled), revision=None, trust_remote_code=False,
                        device="cpu", dtype=torch.float32)


def test_remote_code_is_off_unless_the_config_turns_it_on(tiny_dir, tmp_path):
    """A repo that ships its own model code: refused with a clear error, its code never imported."""
    custom = tmp_path / "custom"
    shutil.copytree(tiny_dir / "captioner", custom)
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "evil_blip"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote-code-ran"
    (custom / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    assert CaptionConfig().trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        CaptionImages(CaptionConfig(model=str(custom)))
    with pytest.raises(ValueError, match="trust_remote_code"):
        model_provenance(AnnotateConfig(caption=CaptionConfig(model=str(custom)),
                                        detect=DetectConfig(model=str(tiny_dir / "detector"))))
    assert not marker.exists()
