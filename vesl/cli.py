"""`vesl` command line: annotate, config, sample, models."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "annotate":
        from pipelines.annotate import main as annotate_main

        return annotate_main(argv[1:])
    p = argparse.ArgumentParser(prog="vesl", description="region-text training data: annotate, config, sample, models")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("annotate", help="run the annotate pipeline (see `vesl annotate --help`)")
    show = sub.add_parser("config", help="print the full annotate config (defaults, preset, file, --set) as YAML")
    show.add_argument("--config", help="YAML config file")
    show.add_argument("--preset", choices=["tiny"])
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    sample = sub.add_parser("sample", help="write sample inputs")
    ssub = sample.add_subparsers(dest="sample_command", required=True)
    hostile = ssub.add_parser("hostile", help="write a hostile-input manifest (broken files, odd images, odd alt-texts)")
    hostile.add_argument("dir")
    models = sub.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command", required=True)
    tiny = msub.add_parser("tiny", help="build the tiny offline random-weight models into DIR")
    tiny.add_argument("dir")
    tiny.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.command == "config":
        import yaml

        from vesl.config import load_config

        config = load_config(args.config, args.preset, args.overrides)
        print(yaml.safe_dump(config.public_dict(), sort_keys=False), end="")
        return 0
    if args.command == "sample":
        from vesl.hostile import write_hostile_sample

        manifest, expected = write_hostile_sample(args.dir)
        valid = sum(v is None for v in expected.values())
        print(f"{manifest}: {valid} valid images, {len(expected) - valid} broken inputs, "
              "1 duplicate id and 2 lines that are not JSON objects")
        return 0
    if args.command == "models" and args.models_command == "tiny":
        from vesl.tiny import build_tiny_models

        for name, path in build_tiny_models(args.dir, overwrite=args.overwrite).items():
            print(f"{name}: {path}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
