"""caption: an image-to-text model writes a caption for each image, next to its alt-text.

Any Hugging Face image-to-text model that loads through `AutoModelForImageTextToText` and
`AutoProcessor`: a BLIP-style captioner (optional text prefix as the prompt), or an instruction VLM
whose processor has a chat template ("Describe this image in detail.", as VeCap prompts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from operators.base import (
    GENERATIVE_SPEED_SETTINGS,
    METRICS,
    GenerativeStageConfig,
    Reject,
    Resources,
    Stage,
    image_from_row,
    served_results,
    token_counts,
)
from schemas.region_text import CaptionSource
from schemas.rejects import RejectReason as R
from vesl.core.text import clean_text, normalize_text

if TYPE_CHECKING:  # pyarrow is imported where a batch is handled, not at import time
    import pyarrow as pa


class CaptionConfig(GenerativeStageConfig):
    section = "caption"
    mode: Literal["model", "alt_text"] = Field(
        default="model", description="'model': the captioner describes the image. 'alt_text': no model, the "
        "row's alt-text stands as its caption (the alt-ngram ablation; a row without alt-text is a reject).")
    model: str = Field(
        default="HuggingFaceTB/SmolVLM-Instruct",
        description="Hub id or local path of an image-to-text model (AutoModelForImageTextToText): an instruction "
        "VLM with prompt_style chat (the default, as VeCap), or a BLIP-style captioner with prompt_style prefix.",
    )
    prompt_style: Literal["prefix", "chat"] = Field(
        default="chat",
        description="'prefix': PROMPT is a caption prefix (BLIP). 'chat': PROMPT is a user turn "
        "rendered with the processor's chat template (instruction VLMs).",
    )
    prompt: str = Field(default="Describe this image in detail.",
                        description="Prefix or instruction; empty means unconditional captioning.")
    max_new_tokens: int = Field(default=160, ge=1, description="Longest caption, in generated tokens.")
    min_new_tokens: int = Field(default=0, ge=0)
    num_beams: int = Field(default=1, ge=1, description="Beam search width (1 = greedy).")
    repetition_penalty: float = Field(default=1.05, gt=0)
    batch_size: int = Field(default=16, ge=1, description="Images per generate() call.")
    attn_implementation: str | None = Field(
        default=None, description="None: transformers' choice (SDPA where the model supports it; BLIP has "
        "only its own eager attention); or 'sdpa', 'eager', 'flash_attention_2'.")
    max_caption_chars: int = Field(default=2000, ge=1, description="Captions are cut to this many characters.")
    processor_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"size": {"longest_edge": 768}},
        description="Extra AutoProcessor.from_pretrained arguments. The default bounds SmolVLM's image splitting "
        "to 2x2 tiles of 384 px + the global view (5 x 81 = 405 visual tokens); set {} for another processor. "
        "backend openai: the server's processor decides (vLLM: --mm-processor-kwargs).")
    image_max_side: int = Field(default=768, ge=16, description="backend openai: the image is sent as a JPEG data "
                                "URL, shrunk to at most this many pixels on its longer side.")
    image_quality: int = Field(default=95, ge=1, le=100, description="backend openai: the JPEG quality it is sent at.")

    def check_backend(self, section: str) -> None:
        super().check_backend(section)
        if self.backend == "openai" and self.mode == "model" and self.prompt_style != "chat":
            raise ValueError("caption.backend openai sends a chat request: caption.prompt_style must be chat "
                             "(an instruction VLM)")


PROBE_IMAGE = np.full((64, 64, 3), 128, dtype=np.uint8)  # the preflight's one request


def jpeg_data_url(image: np.ndarray, max_side: int, quality: int) -> str:
    """IMAGE (H, W, 3 uint8) as a data:image/jpeg;base64 URL, shrunk to at most MAX_SIDE on its longer side."""
    import base64
    import io

    picture = Image.fromarray(image)
    if max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def caption_request(config: CaptionConfig, image: np.ndarray) -> dict[str, Any]:
    """The chat request of one image (backend openai): the same user turn as the local chat prompt, the image as
    a JPEG data URL."""
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": jpeg_data_url(image, config.image_max_side, config.image_quality)}},
        {"type": "text", "text": config.prompt}]}], **config.sampling()}


def clean_caption(text: str, prompt: str, limit: int) -> str:
    """Drop control characters and an echoed prompt prefix, collapse whitespace, cut to LIMIT characters."""
    text = normalize_text(text).replace("\ufffd", "").strip()
    if prompt and text.lower().startswith(prompt.lower()) and len(text) > len(prompt):
        text = text[len(prompt):].strip()
    return text[:limit]


class CaptionImages(Stage):
    """Adds `caption`; each actor loads the model once."""

    name = "caption"
    config_class = CaptionConfig
    reads = ("pixels", "pixel_width", "pixel_height", "alt_text")
    writes = ("caption", "vlm_caption", "caption_source")
    reasons = (R.EMPTY_CAPTION, R.MODEL_ERROR, R.REQUEST_REFUSED)
    resources = Resources(gpu=True)
    speed_settings = GENERATIVE_SPEED_SETTINGS
    metrics = ("prompt_tokens", "visual_tokens", "generated_tokens")

    def __init__(self, config: CaptionConfig | None = None, **kwargs: Any) -> None:
        import torch
        from transformers import AutoModelForImageTextToText

        super().__init__(config, **kwargs)
        if self.config.mode == "alt_text":
            return  # no model
        if self.config.backend == "openai":
            self.client = self.config.client("caption")
            return  # the model runs on the server
        self.processor = self.config.load_processor(**self.config.processor_kwargs)
        self.model, self.device, self.dtype = self.config.load_model(AutoModelForImageTextToText)
        self._torch = torch
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and self.config.prompt_style == "chat":
            tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge

    def _prompt_texts(self, n: int) -> list[str] | None:
        if self.config.prompt_style == "chat":
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.config.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            return [text] * n
        return [self.config.prompt] * n if self.config.prompt else None

    def caption_images(self, images: list[Image.Image]) -> list[str]:
        """Captions for IMAGES, in order (one batched generate call)."""
        return self.generate_captions(images)[0]

    def generate_captions(self, images: list[Image.Image]) -> tuple[list[str], list[dict[str, int]]]:
        """(captions for IMAGES, in order, and each one's token counts: `prompt_tokens` (the visual tokens
        included), `visual_tokens` (where the model puts image tokens in the prompt), `generated_tokens`),
        from one batched generate call."""
        texts = self._prompt_texts(len(images))
        # channels_last said explicitly: a 3-pixel-high image would otherwise be read as channels-first
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt", "input_data_format": "channels_last"}
        if texts is not None:
            kwargs.update(text=texts, padding=True)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self._torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.config.max_new_tokens, min_new_tokens=self.config.min_new_tokens,
                num_beams=self.config.num_beams, repetition_penalty=self.config.repetition_penalty, do_sample=False,
            )
        prompt_ids = inputs.get("input_ids")
        if (prompt_ids is not None and out.shape[1] > prompt_ids.shape[1]
                and self._torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids)):
            out = out[:, prompt_ids.shape[1]:]  # decoder-only models echo the prompt
        decoded = self.processor.batch_decode(out, skip_special_tokens=True)
        prompt = self.config.prompt if self.config.prompt_style == "prefix" else ""
        counts = token_counts(self.model, inputs, out)
        return [clean_caption(t, prompt, self.config.max_caption_chars) for t in decoded], counts

    def serve_captions(self, images: list[np.ndarray]) -> list[dict[str, Any] | Reject]:
        """Each image's caption from the inference server (concurrent requests), or its reject."""
        answers = self.client.complete([caption_request(self.config, image) for image in images])
        return served_results(
            answers, lambda text: clean_caption(text, "", self.config.max_caption_chars),
            lambda text: {"caption": text, "vlm_caption": text, "caption_source": CaptionSource.VLM.value},
            "this image", Reject(R.EMPTY_CAPTION, "the captioner produced no text for this image"))

    @classmethod
    def describe_models(cls, config: CaptionConfig) -> dict[str, Any]:
        if config.mode == "alt_text":
            return {"captioner": {"id": None, "mode": "alt_text"}}
        if config.backend == "openai":  # the preflight: the server answers this stage's request
            return {"captioner": config.client("caption").check(caption_request(config, PROBE_IMAGE))}
        return {"captioner": config.describe()}

    @classmethod
    def wants_gpu(cls, config: CaptionConfig) -> bool:
        return config.mode == "model" and super().wants_gpu(config)

    def process(self, batch: pa.Table) -> list[dict[str, Any] | Reject]:
        if self.config.mode == "alt_text":
            texts = [clean_text(alt, self.config.max_caption_chars) for alt in batch.column("alt_text").to_pylist()]
            return [{"caption": text, "vlm_caption": None, "caption_source": CaptionSource.ALT_TEXT.value}
                    if text else Reject(R.EMPTY_CAPTION, "no alt-text to stand as the caption (caption.mode=alt_text)")
                    for text in texts]
        if self.config.backend == "openai":
            return self.serve_captions([image_from_row(batch, r) for r in range(batch.num_rows)])
        captions, counts = self.generate_captions([Image.fromarray(image_from_row(batch, r))
                                                   for r in range(batch.num_rows)])
        return [{"caption": text, "vlm_caption": text, "caption_source": CaptionSource.VLM.value, METRICS: count}
                if text and text.strip() else Reject(R.EMPTY_CAPTION, "the captioner produced no text for this image")
                for text, count in zip(captions, counts)]
