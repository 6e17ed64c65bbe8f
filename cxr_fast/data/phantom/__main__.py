"""`python -m cxr_fast.data.phantom`: the command line; it words value errors in terms of its flags."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cxr_fast.data.phantom.write import generate_phantom
from cxr_fast.errors import CxrError, SettingError, run_cli


def _as_flag(error: SettingError) -> CxrError:
    """`n_images must be ...` -> `--n-images must be ...`: the user typed flags, not parameters."""
    return CxrError(f"--{error.setting.replace('_', '-')} {error.problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_fast.data.phantom",
                                     description="Write the built-in phantom MIMIC-CXR-JPG + MIMIC-IV data set.")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new, empty, or an old phantom)")
    parser.add_argument("--n-images", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=512, help="square image side in pixels (default 512)")
    parser.add_argument("--no-bias", action="store_true",
                        help="do not make findings harder to see for Black and 80+ patients")
    parser.add_argument("--workers", type=int, default=None, help="drawing processes (default: all cores)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        truth = generate_phantom(args.out, n_images=args.n_images, seed=args.seed, image_size=args.image_size,
                                 bias=not args.no_bias, workers=args.workers)
    except SettingError as error:
        raise _as_flag(error) from None
    seconds = time.perf_counter() - started
    views = truth["counts"]["view"]
    lateral = views.get("LATERAL", 0) + views.get("LL", 0)
    print(f"phantom: {truth['n_images']} images ({truth['n_images'] - lateral} frontal, {lateral} lateral), "
          f"{truth['n_studies']} studies, {truth['n_subjects']} subjects, {args.image_size} px, "
          f"bias {'on' if truth['bias'] else 'off'} -> {args.out} in {seconds:.1f} s "
          f"({truth['n_images'] / seconds:.0f} images/s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
