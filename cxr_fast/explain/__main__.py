"""`python -m cxr_fast.explain --pred-dir all_pred`: heatmaps for the report's gallery images."""

from __future__ import annotations

import argparse

from cxr_fast.errors import run_cli
from cxr_fast.explain.run import __doc__ as LAYOUT, explain
from cxr_fast.recipes import parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_fast.explain", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Grad-CAM heatmaps of each recipe's best checkpoint for the images the report's gallery shows "
                    "(the systematic misses and matched controls of its task).\n\n" + LAYOUT)
    parser.add_argument("--pred-dir", required=True, help="directory of <recipe>.parquet prediction files")
    parser.add_argument("--out", help="where the heatmaps go (default: PRED_DIR/explain, where analyze looks)")
    parser.add_argument("--recipe", action="append", help="only this recipe (repeatable; default: every prediction file)")
    parser.add_argument("--shards", help="shard folder of the images (default: the one each prediction file records)")
    parser.add_argument("--systematic-threshold", type=float, default=0.8,
                        help="as for analyze: which images are systematic misses (default: %(default)s)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    parser.add_argument("rest", nargs="*", help="key=value settings for loading the checkpoints (weights_dir=)")
    args = parser.parse_intermixed_args(argv)
    out = explain(pred_dir=args.pred_dir, out=args.out, recipes=args.recipe, shards=args.shards,
                  overrides=parse_overrides(args.rest), threshold=args.systematic_threshold, device=args.device)
    print(f"heatmaps -> {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
