
import pyarrow as pa
import pytest

from operators.caption import CaptionConfig, CaptionImages, clean_caption
from operators.decode import DecodeImages
from tests.conftest import encode, photo


@pytest.fixture(scope="module")
def captioner(tiny_dir):
    return CaptionImages(CaptionConfig(model=str(tiny_dir / "captioner"), prompt_style="prefix", prompt="",
                                       processor_kwargs={}, max_new_tokens=8, min_new_tokens=2, num_beams=1))


def decoded(n: int) -> pa.Table:
    data = [encode(photo(40 + 10 * i, 30, seed=i)) for i in range(n)]
    return DecodeImages()(pa.table({"image_id": [str(i) for i in range(n)], "image_bytes": data}))


def test_captions_every_row_of_a_batch_through_generate(captioner):
    out = captioner(decoded(3))
    captions = out.column("caption").to_pylist()
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert out.column("reject_stage").to_pylist() == [None] * 3
    assert type(captioner.model).__name__ == "BlipForConditionalGeneration"


def test_batched_and_single_generation_agree(captioner):
    table = decoded(2)
    together = captioner(table).column("caption").to_pylist()
    alone = [captioner(table.slice(i, 1)).column("caption")[0].as_py() for i in range(2)]
    assert together == alone


def test_a_row_that_breaks_the_model_is_rejected_alone(captioner, monkeypatch):
    table = decoded(3)
    original = captioner.generate_captions

    def flaky(images):
        if any(im.width == 50 for im in images):  # the second photo is 50 px wide
            raise RuntimeError("CUDA error: device-side assert")
        return original(images)

    monkeypatch.setattr(captioner, "generate_captions", flaky)
    out = captioner(table)
    assert out.column("reject_reason").to_pylist() == [None, "model_error", None]
    assert out.column("caption").to_pylist()[0]


def test_an_empty_caption_is_a_reject(captioner, monkeypatch):
    monkeypatch.setattr(captioner, "generate_captions", lambda images: (
        ["   " if i == 0 else "a cat" for i in range(len(images))], [{}] * len(images)))
    out = captioner(decoded(2))
    assert out.column("reject_reason").to_pylist() == ["empty_caption", None]


def test_clean_caption():
    assert clean_caption("  a picture of   a dog\n", "a picture of", 100) == "a dog"
    assert clean_caption("a dog " * 100, "", 10) == "a dog a do"



def test_instruction_vlm_with_a_chat_prompt(tiny_dir):
    """The VeCap-style path: a LLaVA-class VLM, the prompt rendered by its chat template, the echoed
    prompt sliced off the decoder-only output."""
    vlm = CaptionImages(CaptionConfig(model=str(tiny_dir / "vlm"), prompt_style="chat", processor_kwargs={},
                                      prompt="Describe this image in detail.", max_new_tokens=6, min_new_tokens=2,
                                      num_beams=1))
    assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"
    out = vlm(decoded(2))
    captions = out.column("caption").to_pylist()
    assert out.column("reject_stage").to_pylist() == [None, None]
    assert all(c and "ASSISTANT" not in c and "Describe this image" not in c for c in captions)
    assert all(c.isprintable() for c in captions)


def test_a_second_vlm_family_smolvlm_with_its_tiling_processor(tiny_dir):
    """SmolVLM (Idefics3), the default captioner's family: another processor (an image is split into
    tiles plus a global view, each tile its own visual tokens), bounded through processor_kwargs."""
    config = CaptionConfig(model=str(tiny_dir / "smolvlm"), max_new_tokens=6, min_new_tokens=2,
                           processor_kwargs={"size": {"longest_edge": 64}})
    assert config.prompt_style == "chat" and config.prompt == "Describe this image in detail."  # the defaults
    vlm = CaptionImages(config)
    assert type(vlm.model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(vlm.processor).__name__ == "Idefics3Processor" and vlm.processor.image_processor.size.longest_edge == 64
    table = DecodeImages()(pa.table({"image_id": ["wide", "tall", "small"], "image_bytes": [
        encode(photo(200, 60, seed=1)), encode(photo(40, 160, seed=2)), encode(photo(20, 20, seed=3))]}))
    out = vlm(table)
    captions = out.column("caption").to_pylist()
    assert out.column("reject_stage").to_pylist() == [None] * 3
    assert all(c and "Assistant" not in c and "Describe this image" not in c and c.isprintable() for c in captions)
    assert out.column("vlm_caption").to_pylist() == captions
    assert out.column("caption_source").to_pylist() == ["vlm"] * 3
    # each row's token counts, as metric columns: the visual tokens are the image tokens its processor put in the
    # prompt (tiles + global view, 1 each here), the prompt holds them, generation stops at max_new_tokens at most
    from PIL import Image

    from operators.base import METRIC_PREFIX, image_from_row

    counts = {m: out.column(f"{METRIC_PREFIX}caption.{m}").to_pylist() for m in vlm.metrics}
    image_token = vlm.processor.tokenizer.convert_tokens_to_ids("<image>")
    for r in range(3):
        enc = vlm.processor(text=vlm._prompt_texts(1), images=[Image.fromarray(image_from_row(table, r))])
        assert counts["visual_tokens"][r] == enc["input_ids"][0].count(image_token) >= 1
    assert all(p > v for p, v in zip(counts["prompt_tokens"], counts["visual_tokens"]))
    assert all(2 <= g <= 6 for g in counts["generated_tokens"])


def test_alt_text_mode_loads_no_model_and_takes_the_alt_text():
    stage = CaptionImages(CaptionConfig(mode="alt_text"))
    assert not hasattr(stage, "model")
    out = stage(pa.table({"image_id": ["a", "b"], "alt_text": ["<b>A red</b> car &amp; a tree", None]}))
    assert out.column("caption").to_pylist() == ["A red car & a tree", None]
    assert out.column("caption_source").to_pylist() == ["alt_text", None]
    assert out.column("reject_reason").to_pylist() == [None, "empty_caption"]


def test_clean_caption_drops_control_characters():
    assert clean_caption("a\x15 dog\x00 \ufffdrunning", "", 100) == "a dog running"

