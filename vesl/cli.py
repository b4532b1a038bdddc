"""`vesl` command line: annotate, train, export, serve, inspect, eval, config, sample, models."""

from __future__ import annotations

import argparse
import sys


def annotate(argv: list[str]) -> int:
    from vesl.annotate.job import main as annotate_main

    return annotate_main(argv)


def train(argv: list[str]) -> int:
    from vesl.cloc.job import main as train_main

    return train_main(argv)


def inspect(argv: list[str]) -> int:
    from vesl.shards.inspect import main as inspect_main

    return inspect_main(argv)


def export(argv: list[str]) -> int:
    from vesl.export.job import main as export_main

    return export_main(argv)


def serve(argv: list[str]) -> int:
    from vesl.serve.job import main as serve_main

    return serve_main(argv)


# subcommands with parsers of their own
PASS_THROUGH = {"annotate": annotate, "train": train, "inspect": inspect, "export": export, "serve": serve}


def parser() -> argparse.ArgumentParser:
    from vesl.annotate.config import preset_names
    from vesl.core.images import RELOCATE_HELP

    p = argparse.ArgumentParser(prog="vesl", description="region-text training data: annotate, train, inspect, eval, "
                                "config, sample, models")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("annotate", help="run the annotate pipeline (see `vesl annotate --help`)")
    sub.add_parser("train", help="train CLOC on region-text shards (see `vesl train --help`)")
    sub.add_parser("export", help="shards as ODVG, GRIT, COCO, LLaVA-style conversations or an HF dataset "
                   "(see `vesl export --help`)")
    sub.add_parser("serve", help="the pipeline as an online service on Ray Serve (see `vesl serve --help`)")
    sub.add_parser("inspect", help="statistics of an annotate OUTPUT, and an HTML report with boxes drawn "
                   "(see `vesl inspect --help`)")
    ev = sub.add_parser("eval", help="region recognition mAcc and region<->text retrieval of a CLOC checkpoint")
    ev.add_argument("shards", nargs="?", help="region-text shards with ground-truth boxes (annotate OUTPUT, folder "
                    "or file); or --coco and --images instead")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a training OUT (its model/)")
    ev.add_argument("--classes", help="with SHARDS: JSON, a list of class names, or name -> [phrases meaning it]")
    ev.add_argument("--coco", metavar="INSTANCES.json", help="a COCO-format instances file (COCO, LVIS): region "
                    "recognition over its categories with its ground-truth boxes (crowd annotations left out)")
    ev.add_argument("--images", help="with --coco: the folder its file_names are in (local or s3://)")
    ev.add_argument("--max-images", type=int, help="with --coco: evaluate the first N images (by id) only")
    ev.add_argument("--baseline", action="store_true",
                    help="RoI-average the patch tokens inside each box instead of using the Prompter")
    ev.add_argument("--template", default="{}", help="class-name prompt, e.g. 'a photo of a {}.' (default: the name)")
    ev.add_argument("--relocate", action="append", default=[], metavar="OLD=NEW", help=RELOCATE_HELP)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-rows", type=int, default=64)
    show = sub.add_parser("config", help="print the full annotate config (defaults, preset, file, --set) as YAML")
    show.add_argument("--config", help="YAML config file")
    show.add_argument("--preset", choices=preset_names(), help="a preset of vesl/annotate/presets/ (e.g. paper, fast, "
                      "alt-ngram, tiny)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    sample = sub.add_parser("sample", help="write sample inputs")
    ssub = sample.add_subparsers(dest="sample_command", required=True)
    hostile = ssub.add_parser("hostile",
                              help="write a hostile-input manifest (broken files, odd images, odd alt-texts)")
    hostile.add_argument("dir")
    shapes = ssub.add_parser("shapes", help="write synthetic region-text shards (coloured shapes, exact boxes)")
    shapes.add_argument("dir")
    shapes.add_argument("--images", type=int, default=2000)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    shapes.add_argument("--no-embed", action="store_true", help="write PNG files and image_uri instead of image_bytes")
    models = sub.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command", required=True)
    tiny = msub.add_parser("tiny", help="build the tiny offline random-weight models into DIR")
    tiny.add_argument("dir")
    tiny.add_argument("--overwrite", action="store_true")
    return p


def show_config(args) -> int:
    import yaml

    from vesl.annotate.config import load_config

    config = load_config(args.config, args.preset, args.overrides)
    print(yaml.safe_dump(config.public_dict(), sort_keys=False), end="")
    return 0


def run_eval(args) -> int:
    import json

    from vesl.cloc.coco import evaluate_coco
    from vesl.cloc.evaluate import evaluate
    from vesl.core.images import parse_relocations

    if bool(args.coco) == bool(args.shards) or (args.coco and not args.images) or (args.shards and not args.classes):
        print("vesl eval: error: give SHARDS with --classes, or --coco INSTANCES.json with --images DIR",
              file=sys.stderr)
        return 2
    try:
        if args.coco:
            result = evaluate_coco(args.coco, args.images, args.checkpoint, template=args.template,
                                   baseline=args.baseline, max_images=args.max_images, device=args.device,
                                   batch_rows=args.batch_rows)
        else:
            result = evaluate(args.shards, args.checkpoint, args.classes, baseline=args.baseline,
                              template=args.template, device=args.device, batch_rows=args.batch_rows,
                              relocate=parse_relocations(args.relocate))
    except (FileNotFoundError, ValueError) as e:
        print(f"vesl eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def write_sample(args) -> int:
    import json

    if args.sample_command == "shapes":
        from vesl.cloc.synthetic import write_shapes_dataset

        print(json.dumps(write_shapes_dataset(args.dir, args.images, seed=args.seed, size=args.size,
                                              embed_images=not args.no_embed)))
        return 0
    from vesl.fixtures.hostile import write_hostile_sample

    manifest, expected = write_hostile_sample(args.dir)
    valid = sum(v is None for v in expected.values())
    print(f"{manifest}: {valid} valid images, {len(expected) - valid} broken inputs, "
          "1 duplicate id and 2 lines that are not JSON objects")
    return 0


def build_models(args) -> int:
    from vesl.fixtures.tiny import build_tiny_models

    for name, path in build_tiny_models(args.dir, overwrite=args.overwrite).items():
        print(f"{name}: {path}")
    return 0


COMMANDS = {"config": show_config, "eval": run_eval, "sample": write_sample, "models": build_models}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        return PASS_THROUGH[argv[0]](argv[1:])
    args = parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
