"""The CLOC training job: region-text shards -> a CLOC checkpoint, on Ray Train.

    python pipelines/train.py SHARDS OUT [--config FILE.yaml] [--preset tiny] [--set k=v ...] [--overwrite]

or `vesl train ...`, or under `ray job submit --working-dir . -- python pipelines/train.py ...`.
SHARDS is an annotate OUTPUT (its data/ folder is read), a folder of shards or one shard, local
or s3://. OUT gets run/ (Ray Train's checkpoints), model/ (the final checkpoint), metrics.jsonl
and train_summary.json. Re-running with the same OUT resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from schemas.region_text import SchemaVersionError
from vesl.cloc.config import load_train_config
from vesl.core.images import RELOCATE_HELP, parse_relocations
from vesl.core.settings import add_config_arguments
from vesl.errors import EXIT_UNREACHABLE, CorruptStateError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vesl train", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="region-text shards: an annotate OUTPUT, a folder of .parquet shards, or one file")
    p.add_argument("out", help="training output folder (local path or s3://...)")
    # sections: model, data, loss, optim, run, storage
    add_config_arguments(p, "loss.region_weight=0", ["tiny"], "tiny: the tiny CLIP built offline")
    p.add_argument("--overwrite", action="store_true", help="discard a training run already in OUT")
    p.add_argument("--allow-partial", action="store_true", help="train on an annotate OUTPUT whose run has not "
                   "finished (some work units or slices still missing); refused without it")
    p.add_argument("--relocate", action="append", default=[], metavar="OLD=NEW",
                   help=RELOCATE_HELP + " (data.relocate)")
    p.add_argument("--print-config", action="store_true", help="print the full effective config as YAML and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    from vesl.cloc.data import UnreadableImagesError
    from vesl.cloc.train import TrainConflictError, run_training

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        moved = parse_relocations(args.relocate)
        config = load_train_config(args.config, args.preset,
                                   args.overrides + ([f"data.relocate={json.dumps(moved)}"] if moved else []))
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config.public_dict(), sort_keys=False), end="")
            return 0
        summary = run_training(args.shards, args.out, config, overwrite=args.overwrite,
                               allow_partial=args.allow_partial)
    except (TrainConflictError, FileNotFoundError, SchemaVersionError, ValueError, CorruptStateError) as e:
        print(f"vesl train: error: {e}", file=sys.stderr)
        return 2
    except UnreadableImagesError as e:
        print(f"vesl train: error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    final = summary.get("final") or {}
    print(f"vesl train: {summary['steps']} steps on {summary['rows']} rows in {summary['wall_s']} s, "
          f"final loss {final.get('loss', float('nan')):.4f}; checkpoint: {summary['model']}")
    print(json.dumps(summary, sort_keys=True))
    return 0
