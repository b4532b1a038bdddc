"""Model-stage throughput on a GPU: needs only PyTorch and transformers (no Ray, no spaCy, no hub).

    python benchmarks/gpu_models.py [--batch-sizes 1,4,8,16,32] [--images 256] [--json FILE]
    python benchmarks/gpu_models.py --tiny      # the tiny models, 8 images: a quick check on the CPU (a test runs it)

Builds the real-size architectures with random weights (throughput does not depend on the weight
values) and saves them with `save_pretrained`, so the operators load them through the same
`from_pretrained` path as a hub checkpoint:
- detector: OWLv2 base/16 at 960x960 (google/owlv2-base-patch16-ensemble's config);
- captioner: BLIP large at 384x384 (Salesforce/blip-image-captioning-large's config).

Measures, on the same 640x480 images with 20 phrases each (drawn from a 300-phrase vocabulary):
- the detector operator (`DetectRegions.detect`: torch preprocessing on the GPU, bf16, SDPA, each
  distinct phrase encoded once) over a batch-size sweep, images/s;
- its achieved FLOP/s (FLOPs of one image counted with torch's FlopCounterMode) against the
  measured bf16 matmul rate of the same GPU;
- the naive HF loop: batch 1, fp32, HF's processor on the CPU, model(**inputs), post-processing;
- the captioner operator (`CaptionImages.caption_images`, bf16, a fixed 30 new tokens, greedy and
  3 beams) over the same sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def synthetic_images(n: int, width: int = 640, height: int = 480, seed: int = 0) -> list[np.ndarray]:
    """Smooth gradients with blocks and noise: JPEG-photo-like statistics, no PIL needed."""
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
    rng = np.random.default_rng(seed)
    words = ["red", "small", "old", "white", "wooden", "large", "green", "black", "cat", "dog", "man", "car",
             "tree", "house", "boat", "cup", "table", "chair", "bird", "flower", "street", "sky", "shirt", "hat"]
    vocab = sorted({" ".join(rng.choice(words, size=rng.integers(1, 4))) for _ in range(vocabulary * 3)})[:vocabulary]
    return [list(dict.fromkeys(rng.choice(vocab, size=per_image)))[:per_image] for _ in range(n)]


def build_real_size_models(root: Path) -> dict[str, Path]:
    """OWLv2 base/16 @ 960 and BLIP large @ 384 with random weights and working processors
    (`vesl.fixtures.real_size`, the one copy of the real-size builders)."""
    from vesl.fixtures.real_size import build_real_size_models as build

    built = build(root, ("detect", "caption_fast"))
    return {"detector": built["detect"], "captioner": built["caption_fast"]}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(fn, n_items: int, device: str, repeat: int = 2) -> float:
    fn()  # warm-up: kernels, allocator, caches
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return repeat * n_items / (time.perf_counter() - start)


def matmul_peak(device: str, dtype=torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matmul FLOP/s of this device in DTYPE."""
    if not device.startswith("cuda"):
        n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.startswith("cuda") else 2
    per_second = rate(lambda: [a @ b for _ in range(reps)], reps, device, repeat=3)
    return per_second * 2 * n ** 3


def detector_flops(detector, image: np.ndarray, phrases: list[str]) -> float:
    """FLOPs of one image through the detector (vision tower, heads and its phrases' text encoder)."""
    from torch.utils.flop_counter import FlopCounterMode

    detector._text_cache.clear()
    with FlopCounterMode(display=False) as counter:
        detector.detect([image], [phrases])
    return float(counter.get_total_flops())


def naive_detector_loop(path: Path, images: list[np.ndarray], queries: list[list[str]], device: str) -> float:
    """HF's documented usage, one image at a time: processor on CPU, fp32 model, post-processing."""
    from PIL import Image
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    processor = Owlv2Processor.from_pretrained(path)
    model = Owlv2ForObjectDetection.from_pretrained(path, dtype=torch.float32).to(device).eval()
    pil = [Image.fromarray(a) for a in images]

    def run():
        for image, q in zip(pil, queries):
            inputs = processor(text=[q], images=image, return_tensors="pt").to(device)
            with torch.no_grad():
                out = model(**inputs)
            processor.post_process_grounded_object_detection(out, threshold=0.1,
                                                             target_sizes=[(image.height, image.width)])
    return rate(run, len(images), device, repeat=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,4,8,16,32")
    p.add_argument("--images", type=int, default=256, help="images per timed pass")
    p.add_argument("--naive-images", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--skip-captioner", action="store_true")
    p.add_argument("--tiny", action="store_true", help="the project's tiny models on a few images and two batch "
                   "sizes: a quick check that the benchmark runs (CPU), not a measurement")
    p.add_argument("--models", default=None, help="folder for the random-weight models (default: a temp dir; "
                   "--tiny: the tiny models' folder)")
    p.add_argument("--json", default=None, help="default: benchmarks/results/gpu_models.json (--tiny: not written)")
    args = p.parse_args()
    if args.tiny:
        args.batch_sizes, args.images, args.naive_images, args.new_tokens = "1,4", 8, 2, 4

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    if args.tiny:
        from vesl.fixtures.tiny import build_tiny_models, tiny_models_dir

        paths = build_tiny_models(Path(args.models) if args.models else tiny_models_dir())
    else:
        paths = build_real_size_models(Path(args.models or tempfile.mkdtemp(prefix="vesl-gpu-models-")))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    images = synthetic_images(args.images)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    results: dict = {"device": name, "dtype": dtype, "torch": torch.__version__, "images": args.images}
    results["matmul_peak_flops"] = matmul_peak(device, torch.bfloat16 if device == "cuda" else torch.float32)
    results.update(bench_detector(paths["detector"], images, phrase_lists(args.images), sizes, device, dtype,
                                  args.naive_images, results["matmul_peak_flops"]))
    if not args.skip_captioner:
        results["captioner"] = bench_captioner(paths["captioner"], images, sizes, device, dtype, args.new_tokens)
    print(format_table(results, args.new_tokens))
    if args.json is None and not args.tiny:
        args.json = str(REPO / "benchmarks" / "results" / "gpu_models.json")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def bench_detector(model: Path, images, queries, sizes: list[int], device: str, dtype: str, naive_images: int,
                   peak: float) -> dict:
    """DetectRegions.detect at each batch size, and the naive HF loop it is compared with."""
    from operators.detect import DetectConfig, DetectRegions

    detector = DetectRegions(DetectConfig(model=str(model), dtype=dtype, threshold=0.1))
    flops = detector_flops(detector, images[0], queries[0])
    out: dict = {"detector_flops_per_image": flops, "detector": {}}
    for b in sizes:
        def run(b=b):
            detector._text_cache.clear()  # count every batch's text encoding, as on fresh phrases
            for i in range(0, len(images), b):
                detector.detect(images[i:i + b], queries[i:i + b])
        img_s = rate(run, len(images), device, repeat=1)
        out["detector"][b] = {"img_s": img_s, "flops_s": img_s * flops, "of_peak": img_s * flops / peak}
    n = min(naive_images, len(images))
    out["naive_detector_img_s"] = naive_detector_loop(model, images[:n], queries[:n], device)
    best = max(out["detector"].values(), key=lambda r: r["img_s"])
    out["detector_speedup_vs_naive"] = best["img_s"] / out["naive_detector_img_s"]
    return out


def bench_captioner(model: Path, images, sizes: list[int], device: str, dtype: str, new_tokens: int) -> dict:
    """CaptionImages.caption_images at each batch size, greedy and with 3 beams."""
    from PIL import Image

    from operators.caption import CaptionConfig, CaptionImages

    pil = [Image.fromarray(a) for a in images]
    out = {}
    for beams in (1, 3):
        captioner = CaptionImages(CaptionConfig(model=str(model), prompt_style="prefix", prompt="",
                                                processor_kwargs={}, dtype=dtype, num_beams=beams,
                                                max_new_tokens=new_tokens, min_new_tokens=new_tokens))
        for b in sizes:
            def run(b=b, captioner=captioner):
                for i in range(0, len(pil), b):
                    captioner.caption_images(pil[i:i + b])
            out[f"beams={beams} batch={b}"] = {"img_s": rate(run, len(pil), device, repeat=1)}
    return out


def format_table(results: dict, new_tokens: int) -> str:
    peak, flops = results["matmul_peak_flops"], results["detector_flops_per_image"]
    lines = [f"device: {results['device']}; {results['dtype']}; torch {results['torch']}; {results['images']} images "
             "640x480, 20 phrases each",
             f"measured matmul peak: {peak / 1e12:.1f} TFLOP/s; detector: {flops / 1e9:.1f} GFLOP per image",
             "", "detector (DetectRegions.detect)   batch    img/s   TFLOP/s   of peak"]
    for b, r in results["detector"].items():
        lines.append(f"{'':34} {b:5d} {r['img_s']:8.1f} {r['flops_s'] / 1e12:9.2f} {100 * r['of_peak']:8.1f}%")
    lines.append(f"naive HF loop (batch 1, fp32, CPU processor)  {results['naive_detector_img_s']:8.1f} img/s   "
                 f"-> ours {results['detector_speedup_vs_naive']:.1f}x")
    if "captioner" in results:
        lines += ["", f"captioner (CaptionImages, {new_tokens} new tokens)          img/s"]
        lines += [f"   {k:<40} {r['img_s']:8.1f}" for k, r in results["captioner"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
