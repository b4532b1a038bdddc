"""`vesl inspect OUTPUT`: what a run produced, as a printed summary and a self-contained HTML report.

Statistics stream over the shards one file at a time (image bytes never read for them): images,
rows, rejects by stage and reason, regions and phrases per image (mean and histogram), words per
region phrase, score quantiles, region sources, the most frequent phrases, and the models and
thresholds recorded in the shard footers. The gallery draws N images picked by a seeded hash of
their image_id (the same N for the same output and seed, whatever the file order).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.registry import funnel, funnel_steps, stage_totals
from schemas.region_text import META_CONFIG_HASH, META_MODELS, META_SCHEMA_VERSION, META_THRESHOLDS, META_VERSION
from vesl.core.images import RELOCATE_HELP, parse_relocations
from vesl.core.outdir import MANIFEST, REJECTS_DIR, OutputDir, open_parquet, read_pages, read_parquet
from vesl.core.storage import filesystem
from vesl.core.text import fmt
from vesl.errors import CorruptStateError
from vesl.shards.read import by_protocol, iter_tables, shard_uris
from vesl.shards.report import stage_rows

log = logging.getLogger("vesl.shards.inspect")

# CLOC (arXiv 2410.02746) reports these for its VESL labels; a real run should land near them.
PAPER = {"regions_per_image": 11.5, "words_per_phrase": 2.1}
STAT_COLUMNS = ["image_id", "caption", "vlm_caption", "caption_source", "phrases", "regions"]
CAPTION_WORDS_CAP = 200  # words-per-caption histogram: the last bin is "200 or more"
HIST_CAP = 30  # histograms of per-image counts: the last bin is "HIST_CAP or more"
SCORE_BINS = 20  # score histogram: 20 bins of 0.05 over [0, 1]
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def sample_key(image_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest(), "big")


def _histogram(counts: np.ndarray, cap: int = HIST_CAP) -> np.ndarray:
    return np.bincount(np.minimum(counts, cap), minlength=cap + 1)


def _mean_from_hist(hist: Mapping[int, int] | np.ndarray, total: float) -> float | None:
    n = float(np.sum(hist))
    return total / n if n else None


def hash_ids(ids) -> np.ndarray:
    """64-bit hashes of image ids (repeated ids are counted from these: 8 bytes a row)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids).astype(object), categorize=False).view(np.int64)


def _rejects(out: OutputDir, examples_per_reason: int = 3) -> tuple[Counter, dict[str, list[dict]]]:
    """Reject counts by "stage/reason", and the first few rejects of each reason."""
    by_reason: Counter = Counter()
    examples: dict[str, list[dict]] = {}
    for path in out.parquet_files(REJECTS_DIR):
        table = read_parquet(out.uri_of(out.rel_of(path)), out.options, "a rejects file",
                             columns=["image_id", "image_uri", "stage", "reason", "message"])
        for row in table.to_pylist():
            key = f"{row['stage']}/{row['reason']}"
            by_reason[key] += 1
            if len(examples.setdefault(key, [])) < examples_per_reason:
                examples[key].append(row)
    return by_reason, examples


class Progress:
    """A tqdm bar on a terminal; otherwise a log line at most every INTERVAL seconds."""

    def __init__(self, total: int, what: str, interval: float = 10.0):
        self.total, self.what, self.interval, self.done = total, what, interval, 0
        self.bar = None
        self.last = time.monotonic()
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=what, unit="file", file=sys.stderr, leave=False)
            except ImportError:
                pass

    def update(self, n: int = 1, **info: Any) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix(info, refresh=False)
        elif time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            extra = "".join(f", {k} {v}" for k, v in info.items())
            log.info("%s: %d/%d files%s", self.what, self.done, self.total, extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


FOOTER_KEYS = {"models": META_MODELS, "thresholds": META_THRESHOLDS, "version": META_VERSION,
               "config_hash": META_CONFIG_HASH, "schema_version": META_SCHEMA_VERSION}


class Tally:
    """What `collect_stats` counts over the shards, one table at a time: histograms and counters whose
    size does not grow with the rows, 8 bytes per row of image_id hashes, and the SAMPLE rows of
    smallest seeded key."""

    def __init__(self, sample: int = 0, seed: int = 0) -> None:
        self.sample, self.seed = sample, seed
        self.rows = self.regions = self.phrases = self.empty = 0
        self.region_hist = np.zeros(HIST_CAP + 1, dtype=np.int64)
        self.phrase_hist = np.zeros(HIST_CAP + 1, dtype=np.int64)
        self.words_hist: Counter = Counter()
        self.sources: Counter = Counter()
        self.phrase_freq: Counter = Counter()
        self.scores: list[np.ndarray] = []
        self.footers: dict[str, Counter] = {k: Counter() for k in FOOTER_KEYS}
        self.picked: list[tuple[int, str, int]] = []  # max-heap by key (negated): the SAMPLE smallest keys
        self.id_hashes: list[np.ndarray] = []  # repeated image_ids: two runs wrote into one OUTPUT
        self.caption_words = {"final": np.zeros(CAPTION_WORDS_CAP + 1, dtype=np.int64),
                              "vlm": np.zeros(CAPTION_WORDS_CAP + 1, dtype=np.int64)}
        self.caption_words_total = {"final": 0, "vlm": 0}
        self.caption_sources: Counter = Counter()

    def add(self, uri: str, table: pa.Table, meta: Mapping[str, str]) -> None:
        self.rows += table.num_rows
        self.id_hashes.append(hash_ids(table.column("image_id").to_numpy(zero_copy_only=False)))
        region_counts = pc.list_value_length(table.column("regions")).to_numpy(zero_copy_only=False).astype(np.int64)
        phrase_counts = pc.list_value_length(table.column("phrases")).to_numpy(zero_copy_only=False).astype(np.int64)
        self.region_hist += _histogram(region_counts)
        self.phrase_hist += _histogram(phrase_counts)
        self.regions += int(region_counts.sum())
        self.phrases += int(phrase_counts.sum())
        self.empty += int((region_counts == 0).sum())
        flat = pc.list_flatten(table.column("regions").combine_chunks())
        if len(flat):
            texts = flat.field("phrase").to_pylist()
            self.phrase_freq.update(texts)
            self.words_hist.update(len(t.split()) for t in texts)
            self.sources.update(flat.field("source").to_pylist())
            self.scores.append(np.asarray(flat.field("score").to_numpy(zero_copy_only=False), dtype=np.float32))
        self.add_captions(table)
        for name, key in FOOTER_KEYS.items():
            if meta.get(key) is not None:
                self.footers[name][meta[key]] += 1
        if self.sample > 0:
            for i, image_id in enumerate(table.column("image_id").to_pylist()):
                k = sample_key(image_id, self.seed)
                if len(self.picked) < self.sample:
                    heapq.heappush(self.picked, (-k, uri, i))
                elif -self.picked[0][0] > k:
                    heapq.heapreplace(self.picked, (-k, uri, i))

    def add_captions(self, table: pa.Table) -> None:
        """Words per final and per VLM caption (a 1.0 shard has no VLM caption), and how captions were made."""
        for kind, column in (("final", "caption"), ("vlm", "vlm_caption")):
            words = pc.list_value_length(pc.utf8_split_whitespace(table.column(column)))
            counts = words.drop_null().to_numpy(zero_copy_only=False).astype(np.int64)
            self.caption_words[kind] += np.bincount(np.minimum(counts, CAPTION_WORDS_CAP),
                                                    minlength=CAPTION_WORDS_CAP + 1)
            self.caption_words_total[kind] += int(counts.sum())
        self.caption_sources.update(s if s is not None else "unknown (schema 1.0)"
                                    for s in table.column("caption_source").to_pylist())

    def caption_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sources": dict(self.caption_sources.most_common())}
        for kind in ("final", "vlm"):
            hist, total = self.caption_words[kind], self.caption_words_total[kind]
            out[f"{kind}_words"] = {"captions": int(hist.sum()), "mean": _mean_from_hist(hist, total),
                                    "histogram": hist.tolist()}
        return out

    def repeated_rows(self) -> int:
        hashes = np.concatenate(self.id_hashes) if self.id_hashes else np.zeros(0, dtype=np.int64)
        return int(len(hashes) - len(np.unique(hashes)))

    def label_stats(self, top: int) -> dict[str, Any]:
        """The regions, phrases, words, scores, sources and top phrases parts of the statistics."""
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0, dtype=np.float32)
        words_total = sum(k * v for k, v in self.words_hist.items())
        return {
            "regions": {"total": self.regions, "per_image_mean": _mean_from_hist(self.region_hist, self.regions),
                        "per_image_histogram": self.region_hist.tolist(), "images_without_regions": self.empty},
            "phrases": {"total": self.phrases, "per_image_mean": _mean_from_hist(self.phrase_hist, self.phrases),
                        "per_image_histogram": self.phrase_hist.tolist(),
                        "distinct_region_phrases": len(self.phrase_freq)},
            "words_per_region_phrase": {"mean": words_total / self.regions if self.regions else None,
                                        "histogram": {str(k): v for k, v in sorted(self.words_hist.items())}},
            "scores": {
                "quantiles": {f"p{int(q * 100)}": float(np.quantile(scores, q)) for q in QUANTILES}
                if len(scores) else {},
                "mean": float(scores.mean()) if len(scores) else None,
                "histogram": np.histogram(scores, bins=SCORE_BINS, range=(0.0, 1.0))[0].tolist(),
            },
            "sources": dict(self.sources.most_common()),
            "captions": self.caption_stats(),
            "top_phrases": self.phrase_freq.most_common(top),
            "footer": {k: [json.loads(v) if k in ("models", "thresholds") else v for v, _ in c.most_common()]
                       for k, c in self.footers.items()},
        }


def collect_stats(output: str, storage_options: Mapping[str, Any] | None = None, *, sample: int = 0, seed: int = 0,
                  top: int = 25) -> dict[str, Any]:
    """Statistics of an annotate OUTPUT (or a folder of shards / one shard).

    With SAMPLE > 0 the result also holds `sample`: that many shard rows (image bytes included when
    the shards carry them), chosen by a seeded hash of image_id."""
    options = by_protocol(output, storage_options)
    uris = shard_uris(output, options)
    out = OutputDir(output, options)
    manifest = out.read_json(MANIFEST, what="run manifest") if out.exists(MANIFEST) else None
    tally = Tally(sample, seed)
    progress = Progress(len(uris), "inspect")
    for uri, table, meta in iter_tables(uris, STAT_COLUMNS, options):
        tally.add(uri, table, meta)
        progress.update(rows=tally.rows, regions=tally.regions)
    progress.close()
    repeated_rows = tally.repeated_rows()
    if repeated_rows:
        log.warning("%s: %d row(s) repeat an image_id already in another row (a shard that is no unit's); `vesl "
                    "annotate` with the same INPUT and OUTPUT moves it aside", output, repeated_rows)
    by_reason, reject_examples = _rejects(out)
    rows, rejects = tally.rows, sum(by_reason.values())
    inputs = int(manifest["counts"]["inputs"]) if manifest and "counts" in manifest else rows + rejects
    by_stage = stage_totals(by_reason)
    stats: dict[str, Any] = {
        "output": output, "shards": len(uris), "images": inputs, "rows": rows, "rejects": rejects,
        "accounted": rows + rejects == inputs and not repeated_rows, "repeated_image_id_rows": repeated_rows,
        "by_stage": by_stage, "by_reason": dict(sorted(by_reason.items())), "reject_examples": reject_examples,
        "funnel": funnel(inputs, by_stage, funnel_steps()),
        **tally.label_stats(top),
        "paper": PAPER,
        "run": {k: manifest.get(k) for k in ("run_id", "input", "started_at", "finished_at", "timings_s")}
        if manifest else None,
        "units": (manifest.get("counts") or {}).get("units") if manifest else None,  # work units done / total
        "stages": (manifest.get("stages") or {}) if manifest else {},  # per stage: rows, rejects, seconds, rows/s
    }
    if sample > 0:
        stats["sample"] = _sample_rows(sorted((-k, uri, i) for k, uri, i in tally.picked), options)
    return stats


def _sample_rows(picked: list[tuple[int, str, int]], storage_options) -> list[dict[str, Any]]:
    """The picked rows in full (image bytes too when the shards carry them), in key order."""
    from schemas.region_text import region_text_schema

    wanted: dict[str, list[int]] = {}
    for _, uri, i in picked:
        wanted.setdefault(uri, []).append(i)
    found: dict[tuple[str, int], dict] = {}
    for uri, indices in wanted.items():
        with open_parquet(uri, storage_options) as pf:
            columns = [c for c in region_text_schema().names if c in pf.schema_arrow.names]
            table = read_pages(pf, uri, columns=columns)
        for i, row in zip(indices, table.take(pa.array(indices)).to_pylist()):
            found[(uri, i)] = row
    return [found[(uri, i)] for _, uri, i in picked]


# text summary ----------------------------------------------------------------------------------

def _bar(value: int, peak: int, width: int = 30) -> str:
    return "#" * (max(1, round(width * value / peak)) if value and peak else 0)


def format_summary(stats: Mapping[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    run = stats.get("run") or {}
    add(f"vesl inspect {stats['output']}")
    if run:
        add(f"  run         {run.get('run_id')}  input {run.get('input')}  finished {run.get('finished_at')}")
    add(f"  images      {stats['images']} inputs -> {stats['rows']} rows + {stats['rejects']} rejects"
        f"  ({'all accounted for' if stats['accounted'] else 'NOT accounted: inputs != rows + rejects'}),"
        f" {stats['shards']} shard file(s)")
    units = stats.get("units")
    if units and units.get("done") != units.get("total"):
        add(f"  units       {units['done']} of {units['total']} work units done: the run (or one of its slices) has "
            "not finished; the figures cover the units done")
    if stats.get("repeated_image_id_rows"):
        add(f"  WARNING     {stats['repeated_image_id_rows']} row(s) repeat an image_id of another row (a shard copied "
            "in by hand?); re-run `vesl annotate` with the same INPUT and OUTPUT to move it aside")
    if stats["by_reason"]:
        add("  rejects     " + ", ".join(f"{k} {v}" for k, v in stats["by_reason"].items()))
    lines += stage_lines(stats.get("stages") or {})
    reg, phr, words = stats["regions"], stats["phrases"], stats["words_per_region_phrase"]
    paper = stats["paper"]
    add(f"  regions     {reg['total']} total, {fmt(reg['per_image_mean'])} per image "
        f"(paper: ~{paper['regions_per_image']}); {reg['images_without_regions']} image(s) without regions")
    add(f"  phrases     {fmt(phr['per_image_mean'])} candidate phrases per image; "
        f"{phr['distinct_region_phrases']} distinct region phrases")
    add(f"  words       {fmt(words['mean'])} per region phrase (paper: ~{paper['words_per_phrase']})")
    caps = stats.get("captions")
    if caps:
        add(f"  captions    {fmt(caps['final_words']['mean'], 1)} words per caption, "
            f"{fmt(caps['vlm_words']['mean'], 1)} per VLM caption; made: "
            + ", ".join(f"{k} {v} ({100 * v / max(1, stats['rows']):.0f}%)" for k, v in caps["sources"].items()))
    q = stats["scores"]["quantiles"]
    if q:
        add("  scores      " + "  ".join(f"{k} {v:.3f}" for k, v in q.items()))
    if stats["sources"]:
        total = sum(stats["sources"].values())
        add("  sources     " + ", ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in stats["sources"].items()))
    hist = reg["per_image_histogram"]
    last = max((i for i, v in enumerate(hist) if v), default=0)
    peak = max(hist) if hist else 0
    add("  regions per image:")
    for i in range(last + 1):
        label = f"{i}+" if i == len(hist) - 1 else str(i)
        add(f"    {label:>4} {hist[i]:7d} {_bar(hist[i], peak)}")
    if stats["top_phrases"]:
        add("  top phrases " + ", ".join(f"{p!r} {n}" for p, n in stats["top_phrases"][:15]))
    models = stats["footer"].get("models") or []
    for m in models:
        for stage, info in m.items():
            extra = f" ({info.get('class')}, revision {info.get('revision')})" if "class" in info else ""
            add(f"  model       {stage}: {info.get('id')}{extra}")
    for t in stats["footer"].get("thresholds") or []:
        add("  thresholds  " + ", ".join(f"{k} {v}" for k, v in t.items()))
    if len(models) > 1 or len(stats["footer"].get("thresholds") or []) > 1:
        add("  note        shards disagree on models or thresholds (several runs wrote here)")
    return "\n".join(lines)


def stage_lines(stages: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The per-stage table of the summary (seconds are summed over a stage's workers: busy time)."""
    if not stages:
        return []
    out = [f"  {'stage':<10}{'rows in':>9}{'rejected':>10}{'seconds':>10}{'rows/s':>9}  rejects by reason"]
    for name, rows, rejected, seconds, rate, reasons in stage_rows(stages):
        out.append(f"  {name:<10}{rows:>9}{rejected:>10}{seconds:>10}{rate:>9}  {reasons}".rstrip())
    return out


def one_line(stats: Mapping[str, Any], report: str | None = None) -> str:
    reg = stats["regions"]
    words = stats["words_per_region_phrase"]["mean"]
    tail = f"; report: {report}" if report else ""
    return (f"vesl inspect: {stats['images']} images -> {stats['rows']} rows, {stats['rejects']} rejects, "
            f"{reg['total']} regions ({fmt(reg['per_image_mean'])}/image, {fmt(words)} words/phrase){tail}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="vesl inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="an annotate OUTPUT, a folder of shards or one shard (local or s3://...)")
    p.add_argument("--out", help="write a self-contained HTML report here (local path or s3://...)")
    p.add_argument("--sample", type=int, default=24, help="images in the report's gallery (default 24)")
    p.add_argument("--seed", type=int, default=0, help="which images the gallery samples")
    p.add_argument("--top", type=int, default=25, help="most frequent phrases to list")
    p.add_argument("--json", dest="json_out", help="also write the statistics as JSON here ('-': stdout)")
    p.add_argument("--thumb-size", type=int, default=512, help="longer side of the gallery images, pixels")
    p.add_argument("--relocate", action="append", default=[], metavar="OLD=NEW", help=RELOCATE_HELP)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from vesl.core.storage import StorageConfig

    storage = StorageConfig().options()  # S3 credentials from the AWS environment
    try:
        moved = parse_relocations(args.relocate)
        stats = collect_stats(args.output, storage, sample=args.sample if args.out else 0, seed=args.seed,
                              top=args.top)
    except (FileNotFoundError, ValueError, CorruptStateError) as e:  # each names the file it failed on
        print(f"vesl inspect: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(stats))
    if args.out:
        from vesl.shards.report import write_report

        write_report(stats, args.out, storage, thumb_size=args.thumb_size, relocations=moved)
    if args.json_out:
        text = json.dumps({k: v for k, v in stats.items() if k != "sample"}, indent=1, default=str)
        if args.json_out == "-":
            print(text)
        else:
            fs, path = filesystem(args.json_out, storage)
            with fs.open(path, "w") as f:
                f.write(text + "\n")
    print(one_line(stats, args.out))
    return 0


__all__ = ["PAPER", "collect_stats", "fmt", "format_summary", "main", "one_line", "sample_key"]
