"""`vesl export OUTPUT DEST --format F`: one Ray task per shard turns its rows into one part file (plus the
image files beside it), then the parts become what the consumer reads.

DEST holds `parts/<shard>.<ext>`, `images/<shard>/<image>.<ext>` (formats that want files),
the merged file (`odvg.jsonl`, `instances.json`, `llava.json`; HF's `dataset_info.json` and `state.json`),
`export.json` (settings and counts, written last) and `_vesl_export/` (the settings, a completion record
per shard, and `skipped/<shard>.jsonl`: every row not exported and why). A shard whose record exists, for
the same version of the shard file, is not done again, so a re-run after a failure finishes the rest (and a
shard rewritten since is exported again); DEST refuses an export with other settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import posixpath
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from vesl.export.coco import Coco, category_list
from vesl.export.common import (
    FORMATS,
    STYLES,
    Counts,
    ExportOptions,
    add_counts,
    file_stem,
    filter_regions,
    grounding_text,
    select_regions,
    upright_image,
)
from vesl.export.grit import Grit
from vesl.export.hf import Hf
from vesl.export.llava import Llava
from vesl.export.odvg import Odvg
from vesl.export.part import Format, Item

WRITERS: dict[str, type[Format]] = {"odvg": Odvg, "grit": Grit, "coco": Coco, "llava": Llava, "hf": Hf}
STATE = "_vesl_export"
SHARD_COLUMNS = ["image_id", "image_uri", "image_bytes", "image_location", "image_offset", "image_length", "width",
                 "height", "alt_text", "caption", "regions"]


def shard_name(uri: str, root: str) -> str:
    """A stable part name for shard URI: its path under the shards' folder, '/' as '-', without '.parquet'."""
    rel = uri[len(root):].lstrip("/") if uri.startswith(root) else posixpath.basename(uri)
    return rel.removesuffix(".parquet").replace("/", "-")


class ShardExport:
    """One shard's export, run in a Ray task: read the shard, write its part, its images, its record."""

    def __init__(self, dest: str, options: ExportOptions, storage: Mapping[str, Any] | None,
                 relocate: Mapping[str, str] | None, categories: dict[str, int] | None) -> None:
        self.dest, self.options, self.storage, self.relocate = dest, options, storage, relocate
        self.categories = categories

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        from vesl.core.outdir import OutputDir
        from vesl.core.storage import filesystem, fingerprint

        out = OutputDir(self.dest, self.storage)
        name = task["name"]
        fs, path = filesystem(task["uri"], self.storage)
        version = fingerprint(fs.info(path))  # a shard rewritten since (annotate --overwrite) is exported again
        if out.exists(STATE, "done", f"{name}.json"):
            record = out.read_json(STATE, "done", f"{name}.json", what="export record")
            if record.get("shard_version") == version:
                return {"name": name, "counts": json.dumps(record["counts"])}
        writer = WRITERS[self.options.format](self.options, self.categories)
        counts, skipped = Counts(), []
        part = f"parts/{name}{writer.part_suffix}"
        with out.staged(part) as f:
            writer.write(f, self.items(task["uri"], name, out, writer, counts, skipped))
        out.remove(STATE, "skipped", f"{name}.jsonl")
        if skipped:
            with out.staged(STATE, "skipped", f"{name}.jsonl") as f:
                f.write("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped).encode())
        out.write_json({"shard": task["uri"], "shard_version": version, "part": part, "counts": counts.as_dict()},
                       STATE, "done", f"{name}.json")
        return {"name": name, "counts": json.dumps(counts.as_dict())}

    def items(self, uri: str, name: str, out, writer: Format, counts: Counts, skipped: list) -> Iterator[Item]:
        from vesl.shards.read import iter_tables

        for _, table, _ in iter_tables([uri], SHARD_COLUMNS, self.storage):
            for start in range(0, table.num_rows, 256):
                for row in table.slice(start, 256).to_pylist():
                    counts.rows += 1
                    item = self.item(row, name, out, writer, counts, skipped)
                    if item is not None:
                        counts.exported += 1
                        counts.regions += len(item.regions)
                        yield item

    def item(self, row: dict[str, Any], name: str, out, writer: Format, counts: Counts, skipped: list) -> Item | None:
        regions = select_regions(row, self.options, counts)
        if self.categories is not None:
            kept = [r for r in regions if r["phrase"] in self.categories]
            counts.drop("phrase_below_min_count", len(regions) - len(kept))
            regions = kept
        grounding = grounding_text(row, regions)
        if writer.needs_spans:
            kept = [k for k, spans in enumerate(grounding.spans) if spans]
            counts.drop("phrase_not_in_text", len(regions) - len(kept))
            regions, grounding.spans = [regions[k] for k in kept], [grounding.spans[k] for k in kept]
        if not regions and not writer.keeps_empty:
            return self.skip(row, "no_regions", "no region left after the filters", counts, skipped)
        item = Item(row={k: v for k, v in row.items() if k != "image_bytes"}, regions=regions, text=grounding.text,
                    text_spans=grounding.spans)
        if writer.wants_files or writer.embeds_images:
            try:
                data, ext, turned = upright_image(self.read(row))
            except Exception as e:  # noqa: BLE001 - an image that cannot be read is that row's skip, with why
                from vesl.core.images import failure_text

                return self.skip(row, "image_unreadable", failure_text(e)[:500], counts, skipped)
            counts.images_reoriented += turned
            item.file = f"images/{name}/{file_stem(row['image_id'])}{ext}"
            if writer.wants_files:
                with out.open(item.file, mode="wb") as f:
                    f.write(data)
                counts.images_written += 1
            if writer.embeds_images:
                item.data = data
        return item

    def read(self, row: Mapping[str, Any]) -> bytes:
        """The row's image from where the shard says it is (its bytes, else its location, else a file or object
        image_uri); an image only a web URL holds is not downloaded again."""
        from vesl.core.images import DEFAULT_FETCH_TIMEOUT_S, DEFAULT_MAX_BYTES, ImageRef, read_image
        from vesl.core.storage import protocol_of

        ref = ImageRef.of(row)
        if ref.data is None and not ref.location and ref.uri and protocol_of(ref.uri) in ("http", "https"):
            raise ValueError(f"the shard holds neither the image's bytes nor its location, only its web URL "
                             f"{ref.uri}: vesl export does not download it again")
        return read_image(ref, self.storage, DEFAULT_MAX_BYTES, DEFAULT_FETCH_TIMEOUT_S, self.relocate)

    @staticmethod
    def skip(row, reason: str, message: str, counts: Counts, skipped: list) -> None:
        counts.skip(reason)
        skipped.append({"image_id": row["image_id"], "image_uri": row.get("image_uri"), "reason": reason,
                        "message": message})
        return None


def phrase_counts(task: dict[str, Any], options: ExportOptions, storage) -> list[dict[str, Any]]:
    """(phrase, regions) of one shard, after the region filters: what the COCO categories are cut from (no spans
    are needed for that, so none are looked for)."""
    from vesl.shards.read import iter_tables

    found: dict[str, int] = {}
    for _, table, _ in iter_tables([task["uri"]], ["image_id", "regions"], storage):
        for row in table.to_pylist():
            for r in filter_regions(row, options, Counts()):
                found[r["phrase"]] = found.get(r["phrase"], 0) + 1
    return [{"phrase": p, "regions": n} for p, n in found.items()]


def _run_shard(task: dict[str, Any], exporter: ShardExport) -> dict[str, Any]:
    return exporter(task)


def _phrases_of(task: dict[str, Any], options: ExportOptions, storage) -> list[dict[str, Any]]:
    return phrase_counts(task, options, storage)


def shard_tasks(source: str, storage) -> list[dict[str, str]]:
    """One task per shard of SOURCE (an annotate OUTPUT, a folder of shards, one shard), in order."""
    from vesl.core.outdir import find_shards
    from vesl.core.storage import uri_prefix

    uris = find_shards(source, storage)
    prefix = uri_prefix(uris[0])
    paths = [u[len(prefix):] for u in uris]
    root = prefix + (posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths))
    tasks = [{"uri": u, "name": shard_name(u, root)} for u in uris]
    if len({t["name"] for t in tasks}) != len(tasks):
        raise ValueError(f"{source}: two shards would give one part name; export their folders one at a time")
    return tasks


def settings_of(source: str, options: ExportOptions) -> dict[str, Any]:
    return {"source": source, "options": json.loads(options.model_dump_json())}


def claim_dest(out, source: str, options: ExportOptions) -> None:
    """DEST is new, or holds an export of SOURCE with these OPTIONS (a re-run finishes it); else ValueError."""
    from vesl.core.storage import canonical_uri, is_within

    if is_within(canonical_uri(out.uri), canonical_uri(source)):
        raise ValueError(f"DEST {out.uri} is inside the shards' folder {source}: export somewhere else")
    wanted = settings_of(source, options)
    if out.exists(STATE, "settings.json"):
        had = out.read_json(STATE, "settings.json", what="export settings")
        if had != wanted:
            raise ValueError(f"{out.uri} holds an export with other settings ({json.dumps(had)}); export into an "
                             "empty DEST, or delete it first")
        return
    if out.exists() and out.names():
        raise ValueError(f"{out.uri} is not empty and holds no vesl export: export into an empty or new folder")
    out.write_json(wanted, STATE, "settings.json")


def coco_categories(out, tasks, options: ExportOptions, storage) -> list[dict]:
    """The COCO categories (kept in DEST, so a re-run numbers them the same), counted on Ray."""
    import ray

    if out.exists(STATE, "categories.json"):
        return out.read_json(STATE, "categories.json", what="COCO categories")["categories"]
    counts = (ray.data.from_items(tasks).flat_map(_phrases_of, fn_kwargs={"options": options, "storage": storage})
              .groupby("phrase").sum("regions"))
    found = {row["phrase"]: int(row["sum(regions)"]) for row in counts.iter_rows()}
    categories = category_list(found, options.min_phrase_count)
    out.write_json({"categories": categories}, STATE, "categories.json")
    return categories


def run_export(source: str, dest: str, options: ExportOptions, storage: Mapping[str, Any] | None = None,
               relocate: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Export SOURCE's shards into DEST on Ray (joined or started); returns what export.json holds."""
    import ray

    from vesl.core.outdir import OutputDir
    from vesl.core.ray import init_ray

    out = OutputDir(dest, storage)
    tasks = shard_tasks(source, storage)
    claim_dest(out, source, options)
    init_ray()
    context: dict[str, Any] = {}
    categories = None
    if options.format == "coco":
        context["categories"] = coco_categories(out, tasks, options, storage)
        categories = {c["name"]: c["id"] for c in context["categories"]}
    exporter = ShardExport(dest, options, storage, relocate, categories)
    done = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(
        _run_shard, fn_kwargs={"exporter": exporter}, num_cpus=1)
    totals: dict[str, Any] = {}
    for row in done.iter_rows():
        totals = add_counts(totals, json.loads(row["counts"]))
    writer = WRITERS[options.format]
    parts = [f"parts/{t['name']}{writer.part_suffix}" for t in tasks]
    context["fingerprint"] = hashlib.sha1(json.dumps([settings_of(source, options), parts]).encode()).hexdigest()[:16]
    files = writer.finish(out, parts, options, context)
    summary = {**settings_of(source, options), "shards": len(tasks), "parts": parts, "files": files,
               "counts": totals, "categories": len(context.get("categories") or []) or None}
    out.write_json(summary, "export.json")
    return summary


EXAMPLES = """formats, and what reads them:
  vesl export out/run exp/odvg --format odvg
      Open-GroundingDino / MM-Grounding-DINO: image root exp/odvg, annotations exp/odvg/odvg.jsonl
  vesl export out/run exp/grit --format grit
      GRIT's layout: pandas.read_parquet("exp/grit/parts"); images read where the shard says (image_location)
  vesl export out/run exp/coco --format coco --min-phrase-count 5
      pycocotools.coco.COCO("exp/coco/instances.json"), images under exp/coco;
      vesl eval --coco exp/coco/instances.json --images exp/coco --checkpoint CKPT
  vesl export out/run exp/llava --format llava --style qwen2.5-vl   (or qwen3-vl, shikra)
      LLaVA / Qwen-VL fine-tuning: data exp/llava/llava.json, image folder exp/llava
  vesl export out/run exp/hf --format hf
      datasets.load_from_disk("exp/hf")
"""


def parser() -> argparse.ArgumentParser:
    from vesl.core.images import RELOCATE_HELP

    p = argparse.ArgumentParser(prog="vesl export", description="Export region-text shards for other trainers: one "
                                "part per shard, on Ray; a re-run into the same DEST finishes what is left.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="an annotate OUTPUT, a folder of shards or one shard (local or s3://...)")
    p.add_argument("dest", help="an empty or new folder (local or s3://...)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--min-score", type=float, default=0.0, help="leave out regions scoring below this")
    p.add_argument("--max-regions", type=int, help="at most N regions per image, best score first")
    p.add_argument("--sources", default="caption,alt_text", help="regions whose phrase came from these texts "
                   "(caption, alt_text; comma-separated)")
    p.add_argument("--min-phrase-count", type=int, default=1, help="coco: phrases with fewer regions are no category")
    p.add_argument("--style", choices=STYLES, default="qwen2.5-vl", help="llava: how the boxes are written")
    p.add_argument("--min-pixels", type=int, default=56 * 56, help="llava qwen2.5-vl: the processor's min_pixels")
    p.add_argument("--max-pixels", type=int, default=28 * 28 * 16384, help="llava qwen2.5-vl: its max_pixels")
    p.add_argument("--pixels", choices=["resized", "original"], default="resized", help="llava qwen2.5-vl: boxes in "
                   "pixels of the image the model sees (smart_resize) or of the original (for trainers that rescale)")
    p.add_argument("--parts-only", action="store_true", help="leave the parts as they are (no odvg.jsonl, "
                   "instances.json or llava.json): for outputs too big for one file")
    p.add_argument("--relocate", action="append", default=[], metavar="OLD=NEW", help=RELOCATE_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from vesl.core.images import parse_relocations
    from vesl.core.ray import stop_ray

    args = parser().parse_args(argv)
    try:
        options = ExportOptions(format=args.format, min_score=args.min_score, max_regions=args.max_regions,
                                sources=args.sources, min_phrase_count=args.min_phrase_count, style=args.style,
                                min_pixels=args.min_pixels, max_pixels=args.max_pixels, pixels=args.pixels,
                                merge=not args.parts_only)
        summary = run_export(args.output, args.dest, options, relocate=parse_relocations(args.relocate))
    except (ValidationError, ValueError, FileNotFoundError) as e:
        print(f"vesl export: error: {e}", file=sys.stderr)
        stop_ray()
        return 2
    counts = summary["counts"]
    print(f"vesl export: {counts.get('exported', 0)} of {counts.get('rows', 0)} rows, {counts.get('regions', 0)} "
          f"regions as {args.format} in {args.dest} ({', '.join(summary['files']) or 'parts/'}); rows skipped: "
          f"{counts.get('skipped') or 'none'} (listed in {STATE}/skipped/); regions left out: "
          f"{counts.get('dropped') or 'none'}")
    return 0
