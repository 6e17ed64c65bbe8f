"""`bench suite` (`make bench`): the CPU suite -> benchmarks/results/<machine>-<date>.json and the
generated table in BENCHMARKS.md, with the targets met or missed."""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Callable

from cxr_fast.bench.data import LOADERS, WORKDIR
from cxr_fast.bench.machine import command_line, load_average, machine_info, now, replace_option
from cxr_fast.bench.records import Record, SuiteResult, Target, TrainResult
from cxr_fast.io import write_json

RESULTS_DIR = Path("benchmarks/results")
TARGETS = {"resident_vs_wds": 10.0, "dali_vs_wds": 1.3, "host_vs_resident": 0.8, "warm_vs_cold_startup": 10.0,
           "train_efficiency": 0.90}

SUITE_DATA = ["data", "--images", "800", "--batch-size", "64", "--image-size", "224", "--repeats", "3",
              "--loaders", ",".join(LOADERS)]
SUITE_TRAIN = [
    ["train", "--arch", "test_convnext", "--loader", "resident", "--image-size", "128", "--batch-size", "32",
     "--steps", "8", "--repeats", "3"],
    ["train", "--arch", "efficientnet_b0", "--loader", "resident", "--image-size", "128", "--batch-size", "32",
     "--steps", "4", "--repeats", "5"],
    # Blocks much longer than DALI's prefetch depth (2), so batches prepared during the
    # neighbouring synthetic block hardly flatter the real one.
    ["train", "--arch", "test_convnext", "--loader", "dali", "--image-size", "128", "--batch-size", "32",
     "--steps", "16", "--repeats", "3"],
]
# For tests: tiny everything.
QUICK_DATA = ["data", "--images", "60", "--batch-size", "8", "--image-size", "64", "--repeats", "2",
              "--seconds", "0.2", "--warmup", "1"]
QUICK_TRAIN = [["train", "--arch", "test_resnet", "--loader", "resident", "--image-size", "32", "--batch-size",
                "8", "--steps", "2", "--repeats", "2", "--warmup", "1", "--images", "60"]]

SUITE_TRAIN_DEADLINE = 360  # s into the suite: later training entries are skipped (keeps make bench < 10 min)


def suite_commands(*, quick: bool, loaders: str, workdir: Path) -> tuple[list[str], list[list[str]]]:
    """The `bench data` and `bench train` arguments the suite runs."""
    data_argv = replace_option(QUICK_DATA if quick else SUITE_DATA, "--loaders", loaders or ",".join(LOADERS))
    train_argvs = [list(item) for item in (QUICK_TRAIN if quick else SUITE_TRAIN)]
    if workdir != WORKDIR:
        data_argv += ["--workdir", str(workdir)]
        train_argvs = [item + ["--workdir", str(workdir)] for item in train_argvs]
    return data_argv, train_argvs


def run_suite(run: Callable[[list[str]], Record], *, out_dir: Path, markdown: Path | None, quick: bool = False,
              loaders: str = "", workdir: Path = WORKDIR, argv: list[str]) -> tuple[SuiteResult, Path]:
    """Run the suite through `run` (one bench command's arguments -> its record); write the
    results file (and regenerate the table in `markdown`). Returns the result and its file."""
    from cxr_fast.bench.report import update_markdown

    started = time.perf_counter()
    data_argv, train_argvs = suite_commands(quick=quick, loaders=loaders, workdir=workdir)
    data = run(data_argv)
    result = SuiteResult(command=command_line(argv), date=now(), machine=machine_info(), data=data)
    for train_argv in train_argvs:
        if time.perf_counter() - started > SUITE_TRAIN_DEADLINE:
            result.train.append(TrainResult(command=command_line(train_argv), status="skipped",
                                            reason=f"suite time budget: {SUITE_TRAIN_DEADLINE} s spent before it "
                                                   "started (a busy machine); run the command alone"))
            continue
        try:
            result.train.append(run(train_argv))
        except Exception as error:  # record, go on with the rest
            result.train.append(TrainResult(command=command_line(train_argv), status="failed",
                                            reason=f"{type(error).__name__}: {error}"))
    result.wall_seconds = round(time.perf_counter() - started, 1)
    result.load_average_end = load_average()
    result.targets = target_report(result)
    path = out_dir / f"{result.machine.machine}-{datetime.date.today().isoformat()}.json"
    write_json(path, result.to_json())
    if markdown:
        update_markdown(markdown, result, path)
    print(f"bench suite: {result.wall_seconds:.0f} s -> {path}" + (f", {markdown}" if markdown else ""),
          file=sys.stderr)
    return result, path


def target_report(result: SuiteResult) -> list[Target]:
    report = []
    for key, label in (("resident/wds", "resident_vs_wds"), ("dali/wds", "dali_vs_wds"),
                       ("host/resident", "host_vs_resident")):
        report.append(_target(f"{key} >= {TARGETS[label]:g}x (CPU, same shards)", result.data.ratios.get(key),
                              TARGETS[label]))
    startup = result.data.startup
    report.append(_target(f"start-up, decoded cache warm vs cold >= {TARGETS['warm_vs_cold_startup']:g}x "
                          "(resident, same shards)", startup.speedup if startup else None,
                          TARGETS["warm_vs_cold_startup"]))
    for entry in result.train:
        if entry.measured and entry.settings.loader == "resident" and entry.efficiency is not None:
            s = entry.settings
            target = TARGETS["train_efficiency"]
            report.append(_target(f"training efficiency >= {target:g} ({s.arch} {s.image_size} px, resident)",
                                  entry.efficiency, target))
    return report


def _target(text: str, value: float | None, target: float) -> Target:
    met = None if value is None else value >= target
    return Target(target=text, value=value, met=met, shortfall=round(target / value, 2) if met is False else None)
