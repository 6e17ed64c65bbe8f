"""`python -m cxr_fast.analyze --pred-dir all_pred --out reports/NAME`: the subgroup report."""

from __future__ import annotations

import argparse

from cxr_fast.analyze.pipeline import Settings, analyze
from cxr_fast.analyze.report import write_report
from cxr_fast.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m cxr_fast.analyze",
        description="Metrics with patient-level bootstrap CIs, subgroup gaps, error consistency and "
                    "systematic misclassification over every all_pred/<recipe>.parquet; writes an HTML report.",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings(split=args.split, n_bootstrap=args.bootstrap, seed=args.seed,
                        systematic_threshold=args.systematic_threshold, min_count=args.min_count, fdr=args.fdr)
    analysis = analyze(pred_dir=args.pred_dir, settings=settings)
    print(write_report(analysis=analysis, out=args.out))
    return 0


if __name__ == "__main__":
    run_cli(main)
