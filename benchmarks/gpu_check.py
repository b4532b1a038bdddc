"""The model stages on one GPU, without Ray: what `benchmarks/gpu_check.sh` runs on a GPU machine.

    bash benchmarks/gpu_check.sh                 # on the GPU machine: the carried wheels, then this script
    python benchmarks/gpu_check.py [--json FILE] [--budget-s 360]
    python benchmarks/gpu_check.py --tiny --json FILE   # the tiny models on the CPU: checks the script (a test)

Needs torch, transformers, pydantic, pyyaml and pillow; no Ray, spaCy, s3fs or hub. It builds the presets'
models at their real sizes with random weights (`vesl.fixtures.real_size`, initialised on the GPU) and drives
the operators' own model methods with each preset's settings (`vesl/annotate/presets/*.yaml`):

- paper: caption (SmolVLM-Instruct, 405 visual tokens, 160 new tokens), fuse (Qwen2.5-1.5B-Instruct, ~380
  prompt and 96 new tokens), detect (OWLv2 B/16 at 960, 20 phrases per image);
- fast: caption_fast (BLIP large, 3 beams, 60 new tokens) and the same detect.

Per stage: images/s over a batch-size sweep (bf16), peak GPU memory (`torch.cuda.max_memory_allocated`, the
weights included) and the batch size it would choose; the naive Hugging Face loop (batch 1, fp32, the HF
processor on the CPU) and the stage's speed-up over it; for detect its achieved FLOP/s against the measured bf16
matmul rate; for fuse static batched `generate` against transformers' continuous batching (`generate_batch`,
paged attention) on the same prompts. From the chosen rates: the pool plan of one 8-GPU node and the GPU-hours
per million images of each preset. Generation is forced to its full length (min_new_tokens = max_new_tokens):
random weights rarely stop, real models stop earlier. The JSON is rewritten after every section, so a run cut
short keeps what it measured; a section that fails is recorded and the script exits 1 at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

GIB = 2**30
# stage -> (preset it is measured for, the preset's config section, the real-size builder, the tiny model)
STAGES = {"detect": ("paper", "detect", "detect", "detector"), "fuse": ("paper", "fuse", "fuse", "fuser"),
          "caption": ("paper", "caption", "caption", "smolvlm"),
          "caption_fast": ("fast", "caption", "caption_fast", "captioner")}
# each preset's GPU stages (decode and phrases run on CPUs); alt-ngram captions nothing and fuses nothing
PRESET_STAGES = {"paper": ("caption", "fuse", "detect"), "fast": ("caption_fast", "detect"), "alt-ngram": ("detect",)}
SWEEPS = {"detect": [1, 4, 8, 16, 32, 64], "fuse": [1, 8, 32, 64, 128], "caption": [1, 8, 32, 64, 128],
          "caption_fast": [1, 8, 32, 64]}
MIN_TIMED_ITEMS = {"detect": 64, "fuse": 1, "caption": 1, "caption_fast": 1}  # items per timed sweep point
NAIVE_ITEMS = {"detect": 8, "fuse": 2, "caption": 2, "caption_fast": 2}
MEMORY_HEADROOM = 0.8  # a chosen batch's peak must stay under this share of the GPU's memory
NEAR_BEST = 0.95  # the chosen batch: the smallest whose rate is within 5% of the best that fits


def cuda(device: str) -> bool:
    return device.startswith("cuda")


def sync(device: str) -> None:
    if cuda(device):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if cuda(device):
        torch.cuda.empty_cache()


def timed(fn, device: str) -> tuple[float, float | None]:
    """(seconds FN takes, its peak allocated GPU bytes; None on the CPU)."""
    sync(device)
    if cuda(device):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, (float(torch.cuda.max_memory_allocated()) if cuda(device) else None)


# --- inputs -----------------------------------------------------------------------------------------------


def synthetic_images(n: int, width: int = 640, height: int = 480, seed: int = 0) -> list[np.ndarray]:
    """Smooth gradients with blocks and noise: photo-like statistics (images of the sample's 640x480 size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(n):
        base = np.stack([(xx * rng.uniform(0.1, 0.4) + yy * rng.uniform(0.1, 0.4) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], axis=-1)
        for _ in range(4):
            x0, y0 = rng.integers(0, width - 64), rng.integers(0, height - 64)
            base[y0:y0 + rng.integers(32, 200), x0:x0 + rng.integers(32, 200)] = rng.uniform(0, 255, 3)
        base += rng.normal(0, 6, base.shape)
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


def phrase_lists(n: int, per_image: int = 20, vocabulary: int = 300, seed: int = 0) -> list[list[str]]:
    """N images' phrase lists (the paper preset's max_phrases = 20), drawn from a shared vocabulary."""
    rng = np.random.default_rng(seed)
    words = ["red", "small", "old", "white", "wooden", "large", "green", "black", "cat", "dog", "man", "car",
             "tree", "house", "boat", "cup", "table", "chair", "bird", "flower", "street", "sky", "shirt", "hat"]
    vocab = sorted({" ".join(rng.choice(words, size=rng.integers(1, 4))) for _ in range(vocabulary * 3)})[:vocabulary]
    return [list(dict.fromkeys(rng.choice(vocab, size=per_image)))[:per_image] for _ in range(n)]


def fusion_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """N (VLM caption, alt-text) pairs of realistic length, in English words the real-size tokenizers know whole:
    a ~150-word description (~160 tokens, the caption stage's max_new_tokens) and a ~25-word alt-text, cleaned
    and cut as the fuse stage cuts it: ~380 prompt tokens with the system turn."""
    from operators.fuse import fusion_alt
    from vesl.fixtures.real_size import ENGLISH_TEXT

    words = ENGLISH_TEXT.split()
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        caption = " ".join(rng.choice(words, size=int(rng.integers(130, 170)))).capitalize() + "."
        alt = " ".join(rng.choice(words, size=int(rng.integers(10, 40)))).title()
        pairs.append((caption, fusion_alt(alt, 400)))
    return pairs


def cycle(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


# --- the stages -------------------------------------------------------------------------------------------


def preset_section(preset: str, section: str) -> dict:
    import yaml

    return dict(yaml.safe_load((REPO / "vesl" / "annotate" / "presets" / f"{preset}.yaml").read_text())
                .get(section) or {})


def stage_config(stage: str, model: Path, device: str, dtype: str, tiny: bool):
    """The preset's config of STAGE with the local MODEL, DEVICE and DTYPE, generation forced to full length."""
    from operators.caption import CaptionConfig
    from operators.detect import DetectConfig
    from operators.fuse import FuseConfig

    preset, section, _, _ = STAGES[stage]
    values = {**preset_section(preset, section), "model": str(model), "device": device, "dtype": dtype}
    if tiny and stage != "detect":
        values["max_new_tokens"] = 6
        if stage == "caption":  # the tiny SmolVLM tiles at 32 px: the preset's 768 px would make 576 tiles
            values["processor_kwargs"] = {"size": {"longest_edge": 64}}
    config = {"detect": DetectConfig, "fuse": FuseConfig}.get(stage, CaptionConfig)(**values)
    if stage != "detect":
        config = config.model_copy(update={"min_new_tokens": config.max_new_tokens})
    return config


def load_stage(stage: str, config):
    from operators.caption import CaptionImages
    from operators.detect import DetectRegions
    from operators.fuse import FuseCaptions

    return {"detect": DetectRegions, "fuse": FuseCaptions}.get(stage, CaptionImages)(config)


def stage_call(stage: str, op):
    """The batch call of the loaded stage OP: items in, its model's work done."""
    if stage == "detect":
        def run(items):
            op._text_cache.clear()  # every batch encodes its phrases, as on fresh phrases
            op.detect([image for image, _ in items], [phrases for _, phrases in items])
        return run
    if stage == "fuse":
        return op.generate_fused
    return lambda images: op.generate_captions(images)


def stage_items(stage: str, n: int) -> list:
    from PIL import Image

    if stage == "fuse":
        return fusion_pairs(n)
    images = synthetic_images(min(n, 16))
    if stage == "detect":
        return cycle(list(zip(images, phrase_lists(len(images)))), n)
    return cycle([Image.fromarray(a) for a in images], n)


# --- measuring --------------------------------------------------------------------------------------------


def sweep(run, items: list, sizes: list[int], min_items: int, device: str, deadline: float) -> dict[int, dict]:
    """RUN at each batch size: images/s over max(B, MIN_ITEMS) items, seconds per call, peak memory.
    Stops at an out-of-memory error, and before a point that would pass DEADLINE (linear estimate)."""
    points: dict[int, dict] = {}
    run(items[:sizes[0]])  # warm-up: kernels, allocator, caches
    last: tuple[float, int] | None = None
    for b in sizes:
        n = b * max(1, min_items // b)
        if last is not None and time.monotonic() + last[0] * n / last[1] > deadline:
            points[b] = {"skipped": "time budget"}
            break
        batches = [items[i:i + b] for i in range(0, n, b)]
        try:
            seconds, peak = timed(lambda: [run(batch) for batch in batches], device)
        except torch.OutOfMemoryError:
            free(device)
            points[b] = {"oom": True}
            break
        last = (seconds, n)
        points[b] = {"img_s": n / seconds, "s_per_call": seconds / len(batches), "items": n,
                     "peak_gib": None if peak is None else peak / GIB}
    return points


def best_rate(points: dict[int, dict]) -> float | None:
    """The highest images/s of a sweep (None when no point ran)."""
    return max((p["img_s"] for p in points.values() if "img_s" in p), default=None)


def choose_batch(points: dict[int, dict], memory_bytes: float | None) -> int | None:
    """The smallest batch whose rate is within NEAR_BEST of the best one that fits under MEMORY_HEADROOM."""
    limit = None if memory_bytes is None else MEMORY_HEADROOM * memory_bytes
    fits = {b: p for b, p in points.items()
            if "img_s" in p and (limit is None or p["peak_gib"] is None or p["peak_gib"] * GIB <= limit)}
    if not fits:
        return None
    best = max(p["img_s"] for p in fits.values())
    return min(b for b, p in fits.items() if p["img_s"] >= NEAR_BEST * best)


def matmul_peak(device: str, dtype) -> float:
    """Measured dense matmul FLOP/s of DEVICE in DTYPE."""
    n, reps = (8192, 20) if cuda(device) else (1024, 2)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _ = a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(reps)], device)
    return reps * 2 * n**3 / seconds


def detect_flops(op, image: np.ndarray, phrases: list[str]) -> float:
    """FLOPs of one image through the detector: vision tower, heads and its phrases' text encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    op._text_cache.clear()
    with FlopCounterMode(display=False) as counter:
        op.detect([image], [phrases])
    return float(counter.get_total_flops())


def naive_detect(config, device: str):
    from PIL import Image
    from transformers import AutoProcessor, Owlv2ForObjectDetection

    processor = AutoProcessor.from_pretrained(config.model)  # the image processor the machine's backends give
    model = Owlv2ForObjectDetection.from_pretrained(config.model, dtype=torch.float32).to(device).eval()

    def one(item):
        image = Image.fromarray(item[0])
        inputs = processor(text=[item[1]], images=image, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model(**inputs)
        processor.post_process_grounded_object_detection(out, threshold=config.threshold,
                                                         target_sizes=[(image.height, image.width)])
    return one, model, type(processor.image_processor).__name__


def naive_fuse(config, device: str, gen: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from operators.fuse import fusion_messages

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).to(device).eval()

    def one(item):
        inputs = tokenizer.apply_chat_template(fusion_messages(*item), add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True).to(device)
        out = model.generate(**inputs, **gen, pad_token_id=tokenizer.pad_token_id)
        tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return one, model, type(tokenizer).__name__


def naive_caption(config, device: str, gen: dict):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(config.model, **config.processor_kwargs)
    model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=torch.float32).to(device).eval()

    def one(image):
        if config.prompt_style == "chat":
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config.prompt}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(text=[text], images=[[image]], return_tensors="pt")
        else:
            inputs = processor(images=image, return_tensors="pt")
        out = model.generate(**inputs.to(device), **gen)
        processor.batch_decode(out, skip_special_tokens=True)
    return one, model, type(processor).__name__


def naive_loop(stage: str, config, items: list, device: str) -> tuple[float, str]:
    """Hugging Face's documented usage, one item at a time: the processor on the CPU, the model in fp32 with
    transformers' defaults, generate (or forward and post-processing). (items/s after one warm-up item, the
    processor's class.)"""
    if stage == "detect":
        one, model, processor = naive_detect(config, device)
    else:
        gen = dict(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens, do_sample=False,
                   num_beams=config.num_beams, repetition_penalty=config.repetition_penalty)
        one, model, processor = (naive_fuse if stage == "fuse" else naive_caption)(config, device, gen)
    try:
        one(items[0])
        seconds, _ = timed(lambda: [one(item) for item in items], device)
    finally:
        del model  # the fp32 copy leaves the GPU before the next stage (with ONE, which holds it)
        one = None
        free(device)
    return len(items) / seconds, processor


def continuous_vs_static(op, pairs: list[tuple[str, str]], batch: int, device: str, tiny: bool = False) -> dict:
    """The fuser's static batched generate (chunks of BATCH, left-padded) against transformers' continuous
    batching (`generate_batch`: paged attention, a sequence leaves as it ends) on the same PAIRS. TINY: a small
    paged cache (left to itself, transformers sizes it from the free memory, on a CPU several GB, zeroed at
    every step: seconds of page faults for four tiny prompts)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    cfg, tokenizer, model = op.config, op.tokenizer, op.model
    counts: list[dict] = []
    seconds, peak = timed(lambda: [counts.extend(op.generate_fused(pairs[i:i + batch])[1])
                                   for i in range(0, len(pairs), batch)], device)
    static = {"prompts_s": len(pairs) / seconds, "generated_tokens": sum(c["generated_tokens"] for c in counts),
              "peak_gib": None if peak is None else peak / GIB}
    static["tokens_s"] = static["generated_tokens"] / seconds
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in op.prompts(pairs)]
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cache = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=512) if tiny else None
    try:
        model.generate_batch(inputs=ids, generation_config=config, continuous_batching_config=cache,
                             persistent_manager=True)  # warm-up, graphs
        outputs: dict = {}
        seconds, peak = timed(lambda: outputs.update(model.generate_batch(
            inputs=ids, generation_config=config, continuous_batching_config=cache, persistent_manager=True)), device)
    finally:
        model.destroy_cached_continuous_batching_manager()
    if len(outputs) != len(ids) or any(o.error for o in outputs.values()):
        raise RuntimeError(f"continuous batching answered {len(outputs)} of {len(ids)} prompts "
                           f"({[o.error for o in outputs.values() if o.error][:1]})")
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    continuous = {"prompts_s": len(ids) / seconds, "generated_tokens": generated, "tokens_s": generated / seconds,
                  "peak_gib": None if peak is None else peak / GIB}
    return {"prompts": len(pairs), "static_batch": batch, "static": static, "continuous": continuous,
            "continuous_over_static": continuous["tokens_s"] / static["tokens_s"]}


# --- the plan ---------------------------------------------------------------------------------------------


def node_plan(rates: dict[str, float], stages: tuple[str, ...], gpus: int = 8) -> dict:
    """The pool plan of one GPUS-GPU node for a preset's STAGES, from each stage's images/s on one GPU.

    GPU-seconds per image are the sum over stages of 1/rate, so GPU-hours per million images = 1e6 * that / 3600
    (whatever the split). Whole GPUs: the split with the highest node rate min(n_s * rate_s) (each stage >= 1
    GPU); fractional: each stage's share of GPU time (Ray's fractional num_gpus, several actors on one GPU
    where memory allows), which reaches gpus / sum(1/rate)."""
    per_image = sum(1.0 / rates[s] for s in stages)
    plan: dict = {"gpu_s_per_image": per_image, "gpu_hours_per_million": 1e6 * per_image / 3600,
                  "fractional": {s: gpus * (1.0 / rates[s]) / per_image for s in stages},
                  "fractional_img_s": gpus / per_image}
    best = None
    for split in itertools.product(range(1, gpus + 1), repeat=len(stages)):
        if sum(split) == gpus:
            rate = min(n * rates[s] for n, s in zip(split, stages))
            if best is None or rate > best[0]:
                best = (rate, dict(zip(stages, split)))
    if best is not None:
        plan["whole_gpus"], plan["whole_img_s"] = best[1], best[0]
        plan["whole_hours_per_million"] = 1e6 / best[0] / 3600  # wall hours of the node
    return plan


def plans(results: dict, gpus: int = 8) -> dict:
    """Each preset's plan from the stages' rates at their chosen batch sizes (presets missing a rate: skipped)."""
    rates = {}
    for stage, r in results.get("stages", {}).items():
        b = r.get("chosen_batch")
        if b is not None and "img_s" in r["sweep"].get(str(b), r["sweep"].get(b, {})):
            rates[stage] = r["sweep"].get(str(b), r["sweep"].get(b))["img_s"]
    return {preset: node_plan(rates, stages, gpus) for preset, stages in PRESET_STAGES.items()
            if all(s in rates for s in stages)}


# --- the run ----------------------------------------------------------------------------------------------


def attempt(results: dict, key: str, fn) -> None:
    """FN(), a part of a stage's section: a failure is recorded under errors[KEY] and the section goes on."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded; the rest of the section still runs
        results["errors"][key] = f"{type(e).__name__}: {e}"
        traceback.print_exc()


def stage_extras(stage: str, op, items: list, out: dict, results: dict, tiny: bool, device: str) -> None:
    """What one stage adds to its sweep: detect's FLOPs, fuse's batching comparison, the token counts."""
    best = best_rate(out["sweep"])
    if stage == "detect":
        def flops():
            out["flops_per_image"] = detect_flops(op, *items[0])
            if best is not None:
                out["best_flops_s"] = best * out["flops_per_image"]
                out["of_matmul_peak"] = out["best_flops_s"] / results["matmul_peak_flops"]
        attempt(results, f"{stage}.flops", flops)
    if stage == "fuse" and out["chosen_batch"]:
        prompts = 4 if tiny else 2 * max(32, out["chosen_batch"])
        attempt(results, f"{stage}.batching", lambda: out.update(batching=continuous_vs_static(
            op, stage_items("fuse", prompts), out["chosen_batch"], device, tiny)))
    if stage == "caption":
        inputs = op.processor(images=[items[0]], text=op._prompt_texts(1), return_tensors="pt",
                              input_data_format="channels_last")
        out["visual_tokens_per_image"] = int((inputs["input_ids"] == op.model.config.image_token_id).sum())
        out["prompt_tokens_per_image"] = int(inputs["input_ids"].shape[1])
    if stage == "fuse":
        enc = op.tokenizer(op.prompts(items[:8]), add_special_tokens=False)
        out["prompt_tokens_per_row"] = float(np.mean([len(ids) for ids in enc["input_ids"]]))


def measure_stage(stage: str, model: Path, args, results: dict, deadline: float) -> None:
    """One stage's section: sweep, chosen batch, its extras, then the naive loop."""
    device, tiny = args.device, args.tiny
    config = stage_config(stage, model, device, args.dtype, tiny)
    out: dict = results["stages"].setdefault(stage, {"preset": STAGES[stage][0]})
    started = time.perf_counter()
    op = load_stage(stage, config)
    out["load_s"] = time.perf_counter() - started
    out["parameters"] = sum(p.numel() for p in op.model.parameters())
    out["weights_gib"] = torch.cuda.memory_allocated() / GIB if cuda(device) else None
    sizes, min_items = ([1, 2], 4) if tiny else (SWEEPS[stage], MIN_TIMED_ITEMS[stage])
    items = stage_items(stage, max(max(sizes), min_items))
    out["sweep"] = sweep(stage_call(stage, op), items, sizes, min_items, device, deadline)
    out["chosen_batch"] = choose_batch(out["sweep"], results.get("gpu_memory_bytes"))
    stage_extras(stage, op, items, out, results, tiny, device)
    del op
    free(device)
    best = best_rate(out["sweep"])

    def naive():
        out["naive_img_s"], out["naive_processor"] = naive_loop(stage, config, items[:1 if tiny else
                                                                                     NAIVE_ITEMS[stage]], device)
        if best is not None:
            out["speedup_vs_naive"] = best / out["naive_img_s"]
    attempt(results, f"{stage}.naive", naive)


def build_models(args) -> dict[str, Path]:
    if args.tiny:
        from vesl.fixtures.tiny import build_tiny_models, tiny_models_dir

        tiny = build_tiny_models(Path(args.models) if args.models else tiny_models_dir())
        return {stage: tiny[STAGES[stage][3]] for stage in args.stages}
    from vesl.fixtures.real_size import build_real_size_models

    root = Path(args.models or tempfile.mkdtemp(prefix="vesl-gpu-check-"))
    built = build_real_size_models(root, tuple(STAGES[s][2] for s in args.stages),
                                   device=args.device if cuda(args.device) else None)
    return {stage: built[STAGES[stage][2]] for stage in args.stages}


def default_json(device_name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return REPO / "benchmarks" / "results" / f"gpu_check-{slug}-{dt.date.today().isoformat()}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="default: benchmarks/results/gpu_check-<gpu>-<date>.json "
                   "(--tiny: not written)")
    p.add_argument("--budget-s", type=float, default=360.0, help="time for the measurements after the models are "
                   "built; each stage gets a share, and a sweep stops before a point that would pass it")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of: " + ", ".join(STAGES))
    p.add_argument("--models", default=None, help="folder for the built models (default: a temp dir; --tiny: "
                   "the tiny models' folder)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="the tiny models on the CPU, two batch sizes, a few items: "
                   "checks the script end to end, measures nothing")
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    if unknown := [s for s in args.stages if s not in STAGES]:
        p.error(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.dtype = "bfloat16" if cuda(args.device) else "float32"
    import transformers

    name = torch.cuda.get_device_name() if cuda(args.device) else f"CPU ({os.cpu_count()} cores)"
    path = Path(args.json) if args.json else (None if args.tiny else default_json(name))
    memory = torch.cuda.get_device_properties(0).total_memory if cuda(args.device) else None
    results: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": name,
                     "dtype": args.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "gpu_memory_bytes": memory,
                     "models": "tiny" if args.tiny else "real size, random weights", "stages": {}, "errors": {}}

    def save() -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")

    started = time.perf_counter()
    results["matmul_peak_flops"] = matmul_peak(args.device, torch.bfloat16 if cuda(args.device) else torch.float32)
    models = build_models(args)
    results["build_s"] = time.perf_counter() - started
    save()
    budget_end = time.monotonic() + args.budget_s
    for k, stage in enumerate(args.stages):
        share = (budget_end - time.monotonic()) / (len(args.stages) - k)
        print(f"gpu_check: {stage} ({share:.0f} s of budget)", file=sys.stderr, flush=True)
        try:
            measure_stage(stage, models[stage], args, results, time.monotonic() + share)
        except Exception as e:  # noqa: BLE001 - recorded; the other stages still run
            results["errors"][stage] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            free(args.device)
        save()
    results["plans"] = plans(results, args.gpus_per_node)
    results["wall_s"] = time.perf_counter() - started
    save()
    print(format_table(results, args.gpus_per_node))
    if path is not None:
        print(f"\nwritten: {path}")
    return 1 if results["errors"] else 0


def format_table(r: dict, gpus: int) -> str:
    gib = "peak GiB" if r["gpu_memory_bytes"] else "peak (CPU: n/a)"
    lines = [f"{r['device']}; {r['dtype']}; torch {r['torch']}, transformers {r['transformers']}; models: "
             f"{r['models']}; matmul peak {r['matmul_peak_flops'] / 1e12:.1f} TFLOP/s; wall {r.get('wall_s', 0):.0f} s",
             "", f"{'stage':13} {'batch':>5} {'img/s':>9} {'s/call':>8} {gib:>15}"]
    for stage, s in r["stages"].items():
        for b, pt in s.get("sweep", {}).items():
            chosen = " <- chosen" if str(b) == str(s.get("chosen_batch")) else ""
            if "img_s" in pt:
                peak = "" if pt["peak_gib"] is None else f"{pt['peak_gib']:.1f}"
                lines.append(f"{stage:13} {b:>5} {pt['img_s']:9.2f} {pt['s_per_call']:8.2f} {peak:>15}{chosen}")
            else:
                lines.append(f"{stage:13} {b:>5} {'out of memory' if pt.get('oom') else pt.get('skipped')}")
        if "naive_img_s" in s:
            ratio = f" -> ours {s['speedup_vs_naive']:.1f}x" if "speedup_vs_naive" in s else ""
            lines.append(f"{stage:13} naive HF loop (batch 1, fp32, CPU processor): {s['naive_img_s']:.2f} img/s"
                         + ratio)
        if "of_matmul_peak" in s:
            lines.append(f"{stage:13} {s['flops_per_image'] / 1e9:.0f} GFLOP/image, {s['best_flops_s'] / 1e12:.1f} "
                         f"TFLOP/s = {100 * s['of_matmul_peak']:.0f}% of the measured matmul peak")
        if "batching" in s:
            bt = s["batching"]
            lines.append(f"{stage:13} {bt['prompts']} prompts: static batch {bt['static_batch']} "
                         f"{bt['static']['tokens_s']:.0f} tok/s, continuous batching {bt['continuous']['tokens_s']:.0f}"
                         f" tok/s ({bt['continuous_over_static']:.2f}x)")
    if r.get("plans"):
        lines += ["", f"one {gpus}-GPU node (rates at the chosen batches; fuse: every row fused, an upper bound)",
                  f"{'preset':10} {'GPU-h / 1M images':>18} {'node img/s':>11} {'whole GPUs per stage':>30}"]
        for preset, plan in r["plans"].items():
            split = ", ".join(f"{s} {n}" for s, n in plan.get("whole_gpus", {}).items())
            lines.append(f"{preset:10} {plan['gpu_hours_per_million']:18.1f} {plan.get('whole_img_s', 0):11.1f} "
                         f"{split:>30}")
    for stage, error in r["errors"].items():
        lines.append(f"ERROR in {stage}: {error}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
