"""`python -m cxr_fast.bench`: the command line. Each subcommand's options become the keyword
arguments of its library function, which returns a typed record; `--json` writes it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cxr_fast.bench
from cxr_fast.bench.data import LOADERS, WORKDIR, bench_data
from cxr_fast.bench.gpu_check import PARTS, GpuCheckResult, gpu_check
from cxr_fast.bench.machine import command_line
from cxr_fast.bench.records import Record, TrainResult
from cxr_fast.bench.report import MARKDOWN
from cxr_fast.bench.resume import kill_and_resume
from cxr_fast.bench.suite import RESULTS_DIR, run_suite
from cxr_fast.bench.train import PRECISIONS, TRAIN_LOADERS, bench_train
from cxr_fast.errors import CxrError, run_cli
from cxr_fast.io import write_json


def run_data(args: argparse.Namespace, argv: list[str]) -> Record:
    return bench_data(loaders=[name.strip() for name in args.loaders.split(",") if name.strip()],
                      batch_size=args.batch_size, image_size=args.image_size, repeats=args.repeats,
                      seconds=args.seconds, warmup=args.warmup, shards=_path(args.shards), images=args.images,
                      workdir=Path(args.workdir), workers=args.workers, ceiling=not args.no_ceiling, argv=argv)


def run_train(args: argparse.Namespace, argv: list[str]) -> Record:
    return bench_train(arch=args.arch, loader=args.loader, image_size=args.image_size, batch_size=args.batch_size,
                       steps=args.steps, repeats=args.repeats, warmup=args.warmup, compile=args.compile,
                       channels_last=args.channels_last, precision=args.precision, shards=_path(args.shards),
                       images=args.images, workdir=Path(args.workdir), argv=argv)


def run_resume(args: argparse.Namespace, argv: list[str]) -> Record:
    return kill_and_resume(Path(args.shards), Path(args.workdir) / "resume", recipe=args.recipe, epochs=args.epochs,
                           kill_after_epoch=args.kill_after_epoch, settings=args.settings, compare=args.compare,
                           timeout=args.timeout, command=command_line(argv))


def run_suite_command(args: argparse.Namespace, argv: list[str]) -> Record:
    result, _path_written = run_suite(run_command, out_dir=Path(args.out), markdown=_path(args.markdown),
                                      quick=args.quick, loaders=args.loaders, workdir=Path(args.workdir), argv=argv)
    return result


def run_gpu_check(args: argparse.Namespace, argv: list[str]) -> Record:
    parts = tuple(name.strip() for name in args.parts.split(",") if name.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise CxrError(f"unknown gpu-check part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return gpu_check(Path(args.out_dir), tiny=args.tiny, parts=parts, workdir=_path(args.workdir), argv=argv)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxr_fast.bench", description=cxr_fast.bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="images/s of augmented batches delivered on the device, per loader")
    data.add_argument("--images", type=int, default=800, help="phantom images to draw (about 2/3 are kept frontal)")
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--image-size", type=int, default=224)
    data.add_argument("--repeats", type=int, default=3)
    data.add_argument("--seconds", type=float, default=3.0, help="target length of one timed block")
    data.add_argument("--warmup", type=int, default=3, help="batches before timing")
    data.add_argument("--loaders", default=",".join(LOADERS))
    data.add_argument("--shards", help="use these shards instead of the cached bench phantom")
    data.add_argument("--workers", type=int, default=0, help="worker processes/threads (default: one per core)")
    data.add_argument("--no-ceiling", action="store_true", help="skip the decode-rate measurement")
    data.add_argument("--workdir", default=str(WORKDIR), help="cache for the phantom and its shards")
    data.add_argument("--json", help="write the result here")
    data.set_defaults(handler=run_data)

    train = commands.add_parser("train", help="end-to-end training images/s, real loader vs synthetic batch")
    train.add_argument("--arch", required=True)
    train.add_argument("--loader", default="resident", help=" | ".join(TRAIN_LOADERS))
    train.add_argument("--image-size", type=int, default=0, help="default: the arch's native size")
    train.add_argument("--batch-size", type=int, default=0, help="default: the arch's registry batch size")
    train.add_argument("--steps", type=int, default=10, help="steps per timed block")
    train.add_argument("--repeats", type=int, default=3)
    train.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation happens here)")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    train.add_argument("--precision", default="auto", choices=PRECISIONS)
    train.add_argument("--shards", help="shards for the real loader (default: the cached bench phantom)")
    train.add_argument("--images", type=int, default=800, help="phantom size when no --shards is given")
    train.add_argument("--workdir", default=str(WORKDIR))
    train.add_argument("--json", help="write the result here")
    train.set_defaults(handler=run_train)

    resume = commands.add_parser("resume", help="kill -9 a training run after a checkpoint; check the rerun resumes")
    resume.add_argument("--shards", required=True)
    resume.add_argument("--recipe", default="effusion_test_resnet")
    resume.add_argument("--epochs", type=int, default=3)
    resume.add_argument("--kill-after-epoch", type=int, default=1, help="the checkpoint after which the run is killed")
    resume.add_argument("--compare", action="store_true",
                        help="also train uninterrupted and require bit-identical weights (give deterministic=true)")
    resume.add_argument("--timeout", type=float, default=180, help="seconds allowed for each run (a hang stops there)")
    resume.add_argument("--workdir", default=str(WORKDIR))
    resume.add_argument("--json", help="write the result here")
    resume.add_argument("settings", nargs="*", help="extra key=value training settings (e.g. image_size=64)")
    resume.set_defaults(handler=run_resume)

    check = commands.add_parser("gpu-check", help="the GPU path end to end in < 10 min -> OUT_DIR/gpu-check.json")
    check.add_argument("out_dir")
    check.add_argument("--tiny", action="store_true", help="tiny settings, on the CPU too (tests)")
    check.add_argument("--parts", default=",".join(PARTS), help="restrict the parts (comma-separated)")
    check.add_argument("--workdir", help="phantom, shards and runs (default: OUT_DIR/work)")
    check.set_defaults(handler=run_gpu_check)

    suite = commands.add_parser("suite", help="the CPU suite of `make bench`")
    suite.add_argument("--out", default=str(RESULTS_DIR), help="folder for <machine>-<date>.json")
    suite.add_argument("--markdown", default=str(MARKDOWN), help="regenerate the table in this file ('' to skip)")
    suite.add_argument("--loaders", default="", help="restrict the data loaders (comma-separated)")
    suite.add_argument("--quick", action="store_true", help="tiny settings (tests)")
    suite.add_argument("--workdir", default=str(WORKDIR))
    suite.set_defaults(handler=run_suite_command)
    return parser


def run_command(argv: list[str]) -> Record:
    """One subcommand's arguments -> its result record (the suite runs its parts through this)."""
    args = build_parser().parse_args(argv)
    return args.handler(args, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    result = args.handler(args, argv)
    if getattr(args, "json", None):
        write_json(Path(args.json), result.to_json())
        print(f"bench: wrote {args.json}", file=sys.stderr)
    if isinstance(result, GpuCheckResult) and any(part.status == "failed" for part in result.parts.values()):
        return 1
    if isinstance(result, TrainResult) and result.stopped:
        return 130  # stopped by a signal: what was measured is kept above, the run is still not whole
    return 0


if __name__ == "__main__":
    run_cli(main)
