"""`python -m cxr_fast.analyze --pred-dir all_pred --out reports/NAME`: the subgroup report.

`python -m cxr_fast.analyze export-review --task T --out DIR`: the gallery's images for a reader study."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr_fast.analyze.gallery import EXPLAIN_FOLDER, build_gallery
from cxr_fast.analyze.pipeline import Settings, analyze
from cxr_fast.analyze.report import write_report
from cxr_fast.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m cxr_fast.analyze",
        description="Metrics with patient-level bootstrap CIs, subgroup gaps, error consistency and "
                    "systematic misclassification over every all_pred/<recipe>.parquet; writes an HTML report.",
        epilog="python -m cxr_fast.analyze export-review --task T --out DIR: the gallery's images of one task for a "
               "reader study (export-review --help).",
    )
    parser.add_argument("--pred-dir", required=True, help="directory of <recipe>.parquet prediction files")
    parser.add_argument("--out", required=True, help="report directory (index.html, summary.json, CSVs)")
    parser.add_argument("--split", default=defaults.split, help="split to analyse (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=defaults.n_bootstrap, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="bootstrap seed (default: %(default)s)")
    parser.add_argument("--systematic-threshold", type=float, default=defaults.systematic_threshold,
                        help="share of models wrong that makes an image systematically misclassified (default: %(default)s)")
    parser.add_argument("--min-count", type=int, default=defaults.min_count,
                        help="positives and negatives a group needs to be tested (default: %(default)s)")
    parser.add_argument("--fdr", type=float, default=defaults.fdr, help="Benjamini-Hochberg q (default: %(default)s)")
    add_image_arguments(parser)
    return parser


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", help="shard folder of the images (default: the one the prediction files record)")
    parser.add_argument("--explain-dir", help="heatmaps from python -m cxr_fast.explain (default: PRED_DIR/explain)")
    parser.add_argument("--no-images", action="store_true",
                        help="leave every radiograph out of the report (MIMIC's data use agreement forbids sharing them)")


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export-review"]:
        from cxr_fast.analyze.review import main as export_review

        return export_review(argv[1:])
    args = build_parser().parse_args(argv)
    settings = Settings(split=args.split, n_bootstrap=args.bootstrap, seed=args.seed,
                        systematic_threshold=args.systematic_threshold, min_count=args.min_count, fdr=args.fdr)
    analysis = analyze(pred_dir=args.pred_dir, settings=settings)
    gallery = build_gallery(tasks=analysis.tasks, files=list(analysis.inputs["file"]), threshold=settings.systematic_threshold,
                            images=not args.no_images, shards=args.shards,
                            explain_dir=args.explain_dir or Path(args.pred_dir) / EXPLAIN_FOLDER)
    print(write_report(analysis=analysis, out=args.out, gallery=gallery))
    return 0


if __name__ == "__main__":
    run_cli(main)
