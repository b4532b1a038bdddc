"""Tiny random-weight models of the real classes, built offline.

Tests and the demo cannot reach the Hugging Face hub, so `vesl models tiny DIR` builds a
captioner (BLIP), two instruction VLMs (LLaVA; SmolVLM, an Idefics3), a fusion LLM (Qwen2), a detector
(OWLv2) and a CLIP model with real
architectures, real processors and tokenizers trained here on a small built-in corpus, and saves
each with `save_pretrained`.
They load back through the same `from_pretrained` code a hub id takes. Their outputs are
structurally valid and semantically meaningless.
"""

from __future__ import annotations

from pathlib import Path

# A small English corpus for the tiny tokenizers: enough words that captions and phrases
# tokenize into real sub-words instead of single bytes.
_CORPUS = """
a photo of a cat sitting on a red sofa next to a window with white curtains
an astronaut in a white space suit holding a helmet in front of an american flag
a cup of coffee with latte art on a saucer on a wooden table with a spoon
a rocket launching from a launch pad with smoke and fire under a blue sky
a black and white camera man standing on a grass field with a tripod
a dog running on the beach near the ocean waves at sunset
two people riding bicycles down a city street past tall buildings and parked cars
a bowl of fruit with apples bananas and oranges on a kitchen counter
a green tree in a park with a bench and a small brown bird
the old man wears a hat and glasses while reading a newspaper in the morning light
a close up of a flower with yellow petals and a bee collecting pollen
a large airplane flying over snowy mountains and a frozen lake
children playing football in a school yard on a sunny afternoon
a plate of pasta with tomato sauce and basil leaves beside a glass of wine
a horse standing in a field of tall grass near a wooden fence
a red circle a green square a blue triangle a yellow circle and a purple square on a gray background
"""


def _clip_bpe_tokenizer(vocab_size: int = 1000):
    """A CLIPTokenizer whose BPE vocabulary is trained here, with CLIP's special-token layout.

    As in the real CLIP vocabulary, <|startoftext|> and <|endoftext|> take the last two ids,
    so the start token's id is > 0 (OWLv2 treats a query whose first id is 0 as padding).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator([_CORPUS.lower()] * 4, trainer=trainer)
    vocab = bpe.get_vocab()
    # Every single byte must also exist as a word end, or an unseen final byte becomes unknown.
    for char in sorted(alphabet):
        vocab.setdefault(char + "</w>", len(vocab))
    merges = _merges_of(bpe)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def _merges_of(bpe) -> list[tuple[str, str]]:
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _wordpiece_vocab() -> dict[str, int]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=800,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"],
        show_progress=False,
    )
    wp.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return wp.get_vocab()


def build_tiny_owlv2(out: Path, image_size: int = 64) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    tokenizer = _clip_bpe_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=16,
    )
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    _seeded()
    model = Owlv2ForObjectDetection(config).eval()
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def build_tiny_blip(out: Path, image_size: int = 32) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    tokenizer = BertTokenizer(vocab=_wordpiece_vocab(), bos_token="[DEC]", model_max_length=64)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
        bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=16)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    _seeded()
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def build_tiny_clip(out: Path, image_size: int = 64) -> Path:
    """The CLOC trainer's tiny CLIP: 8-px patches (an 8x8 grid at 64 px, fine enough to tell shapes
    in the synthetic set apart), width 64, so a from-scratch run learns on a CPU in minutes."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = _clip_bpe_tokenizer()
    tokenizer.model_max_length = 24
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=24,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)
    _seeded()
    model = CLIPModel(config).eval()
    size = {"shortest_edge": image_size}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size=size, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_vlm(out: Path, image_size: int = 32) -> Path:
    """A tiny LLaVA (CLIP vision tower + Llama decoder) with a chat template: the instruction-VLM
    captioner path ("Describe this image in detail.") exercised offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"}, chat_template=_CHAT_TEMPLATE)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=16, projection_dim=32)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    patches = (image_size // 16) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=patches,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    _seeded()
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default",
        chat_template=_CHAT_TEMPLATE, num_additional_image_tokens=1,  # CLIP's CLS token
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


# ChatML, as Qwen2.5-Instruct's template renders system/user/assistant turns of plain-text content.
_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_fuser(out: Path) -> Path:
    """A tiny Qwen2 decoder (the architecture of Qwen2.5-Instruct) with a byte-level BPE tokenizer and
    a ChatML chat template: the fusion LLM path (AutoModelForCausalLM + AutoTokenizer) offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        chat_template=_CHATML_TEMPLATE)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    _seeded()
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # whitespace and partial-character tokens never win, so the text has words
        texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        blank = [i for i, t in enumerate(texts) if not t.strip() or "\ufffd" in t]
        model.lm_head.weight[blank] = 0.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# SmolVLM's template (Idefics3 processor): "User:<image>PROMPT<end_of_utterance>\nAssistant:"
_SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_smolvlm(out: Path) -> Path:
    """A tiny SmolVLM (Idefics3: SigLIP-style vision tower, pixel shuffle, Llama decoder) with its
    processor, which splits an image into tiles plus a global view: a second instruction-VLM family,
    with another processor than LLaVA's, for the captioner's chat path offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", bos_token="<|im_start|>",
                                        eos_token="<end_of_utterance>", chat_template=_SMOLVLM_TEMPLATE)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    _seeded()
    model = Idefics3ForConditionalGeneration(config).eval()
    # tiles of 32 px (one visual token each after the 2x2 pixel shuffle), images up to 64 px: <= 4 tiles + global
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}),
        tokenizer=tokenizer, image_seq_len=1, chat_template=_SMOLVLM_TEMPLATE)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


TINY_MODELS = {"captioner": build_tiny_blip, "detector": build_tiny_owlv2, "clip": build_tiny_clip,
               "vlm": build_tiny_vlm, "smolvlm": build_tiny_smolvlm, "fuser": build_tiny_fuser}



# Bump when a tiny model's recipe changes: models built by an older recipe are rebuilt.
TINY_VERSION = "3"
VERSION_FILE = ".vesl-tiny-version"  # in each model's folder: the recipe version it was built by


def _is_current(out: Path) -> bool:
    marker = out / VERSION_FILE
    return marker.exists() and marker.read_text() == TINY_VERSION


def build_tiny_models(root: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Build every tiny model under ROOT/<name>; an existing model of this recipe version is kept.
    Several processes may build into one ROOT at once: each builds in a folder of its own and moves
    it into place; a model another process finished meanwhile is kept (the recipes are seeded, so
    both builds are the same)."""
    import shutil
    import uuid

    root = Path(root)
    built = {}
    for name, build in TINY_MODELS.items():
        out = root / name
        if overwrite or not _is_current(out):
            tmp = root / f".{name}.{uuid.uuid4().hex[:12]}.partial"
            tmp.mkdir(parents=True)
            try:
                build(tmp)
                (tmp / VERSION_FILE).write_text(TINY_VERSION)
                if overwrite or not _is_current(out):
                    shutil.rmtree(out, ignore_errors=True)
                    try:
                        tmp.rename(out)
                    except OSError:  # another process moved its build into place first
                        if not _is_current(out):
                            raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        built[name] = out
    return built


def _seeded(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
