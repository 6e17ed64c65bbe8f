"""The study runner: train every selected recipe on this machine, or write a Slurm array.

    python -m cxr_fast.sweep --tasks all --archs all                 # 114 recipes
    python -m cxr_fast.sweep --tasks effusion,edema --archs 'convnext_*' epochs=100
    python -m cxr_fast.sweep --tasks all --archs all --dry-run       # print the commands
    python -m cxr_fast.sweep --tasks all --archs all --slurm study.sbatch

One run per visible GPU at a time (sequentially on a CPU). A recipe whose
`weights/<recipe>/status.json` says finished is skipped; an interrupted one resumes, since
rerunning the training command resumes from `last.pt`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cxr_fast.errors import CxrError, run_cli
from cxr_fast.io import atomic_path
from cxr_fast.models import list_archs
from cxr_fast.recipes import load_config, parse_overrides, recipe_name
from cxr_fast.tasks import TASKS, task_name


def select_tasks(text: str) -> list[str]:
    return list(TASKS) if text == "all" else [task_name(item) for item in text.split(",") if item]


def select_archs(text: str) -> list[str]:
    if text == "all":
        return list_archs(study_only=True)
    chosen: list[str] = []
    for pattern in (item for item in text.split(",") if item):
        matches = list_archs(pattern)
        if not matches:
            raise CxrError(f"--archs: no arch matches {pattern!r}")
        chosen += [slug for slug in matches if slug not in chosen]
    return chosen


def is_finished(recipe: str, weights_dir: Path) -> bool:
    path = weights_dir / recipe / "status.json"
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("finished"))
    except json.JSONDecodeError:
        return False


def train_command(recipe: str, overrides: list[str], *, launcher: list[str]) -> list[str]:
    return [*launcher, "-m", "cxr_fast.train", "--recipe", recipe, "--no-progress", *overrides]


def visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [item for item in listed.split(",") if item.strip()]
    try:
        import torch

        return [str(index) for index in range(torch.cuda.device_count())]
    except ImportError:
        return []


def run_local(commands: list[tuple[str, list[str]]], *, logs: Path) -> int:
    """Run the commands, one per GPU at a time (one at a time on CPU); return failures."""
    slots: list[str | None] = visible_gpus() or [None]
    running: dict[str | None, tuple[str, subprocess.Popen]] = {}
    failures = 0
    queue = list(commands)
    logs.mkdir(parents=True, exist_ok=True)
    while queue or running:
        for slot in [slot for slot in slots if slot not in running and queue]:
            recipe, command = queue.pop(0)
            env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {})
            log = open(logs / f"{recipe}.log", "a")
            print(f"start {recipe}" + (f" on GPU {slot}" if slot is not None else ""), flush=True)
            running[slot] = (recipe, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
            log.close()  # the child holds its own copy of the descriptor
        for slot, (recipe, process) in list(running.items()):
            if process.poll() is not None:
                del running[slot]
                failures += process.returncode != 0
                print(f"{'done' if process.returncode == 0 else f'FAILED ({process.returncode})'} {recipe}"
                      f"  (log: {logs / f'{recipe}.log'})", flush=True)
        time.sleep(0.5)
    return failures


def run_in_process(recipes: list[str], overrides: list[str]) -> int:
    """Train the recipes one after another in this process (CPU): saves the interpreter and
    library start-up of a subprocess per recipe. A failed recipe is reported and skipped."""
    from cxr_fast.train import train

    failures = 0
    for recipe in recipes:
        print(f"start {recipe}", flush=True)
        try:
            result = train(load_config(recipe, overrides), progress_bar=False)
            print(f"done {recipe}: best epoch {result['best_epoch']} "
                  f"(val balanced accuracy {result['best_balanced_accuracy']:.3f})", flush=True)
        except CxrError as error:
            failures += 1
            print(f"FAILED {recipe}: {error}", flush=True)
    return failures


def slurm_script(recipes: list[str], overrides: list[str], *, weights_dir: str, gpus_per_task: int, time_limit: str,
                 partition: str) -> str:
    """An sbatch array: task i trains recipe i with `accelerate launch` on its own GPUs."""
    lines = "\n".join(shlex.quote(recipe) for recipe in recipes)
    extra = " ".join(shlex.quote(item) for item in overrides)
    partition_line = f"#SBATCH --partition={partition}\n" if partition else ""
    return f"""#!/bin/bash
#SBATCH --job-name=cxr_fast
#SBATCH --array=0-{len(recipes) - 1}
#SBATCH --gres=gpu:{gpus_per_task}
#SBATCH --cpus-per-task={8 * gpus_per_task}
#SBATCH --time={time_limit}
#SBATCH --output=runs/slurm-%A_%a.log
{partition_line}# Written by `python -m cxr_fast.sweep --slurm`. Resubmitting resumes unfinished recipes.
set -euo pipefail
cd {shlex.quote(str(Path.cwd()))}
RECIPES=(
{lines}
)
RECIPE=${{RECIPES[$SLURM_ARRAY_TASK_ID]}}
if python -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('finished') else 1)" \
    {shlex.quote(weights_dir)}/"$RECIPE"/status.json 2>/dev/null; then
  echo "$RECIPE already finished"; exit 0
fi
accelerate launch --num_processes {gpus_per_task} -m cxr_fast.train --recipe "$RECIPE" --no-progress {extra}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_fast.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="all", help="all, or a comma list of task slugs/indices")
    parser.add_argument("--archs", default="all", help="all (the 19 study archs), or a comma list of slugs/wildcards")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--slurm", type=Path, metavar="FILE", help="write an sbatch --array script instead of running")
    parser.add_argument("--gpus-per-task", type=int, default=1, help="with --slurm (default 1)")
    parser.add_argument("--time", default="48:00:00", help="with --slurm: time limit per recipe")
    parser.add_argument("--partition", default="", help="with --slurm")
    parser.add_argument("--logs", type=Path, default=Path("runs/sweep"), help="one log per recipe (default runs/sweep)")
    parser.add_argument("--in-process", action="store_true",
                        help="train one recipe after another in this process (CPU; no per-recipe start-up)")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every recipe")
    args = parser.parse_args(argv)

    recipes = [recipe_name(task, arch) for arch in select_archs(args.archs) for task in select_tasks(args.tasks)]
    settings = parse_overrides(args.overrides)
    configs = {recipe: load_config(recipe, settings) for recipe in recipes}  # validate everything up front

    if args.slurm:
        with atomic_path(args.slurm) as tmp:
            tmp.write_text(slurm_script(recipes, args.overrides, weights_dir=configs[recipes[0]].weights_dir,
                                        gpus_per_task=args.gpus_per_task,
                                        time_limit=args.time, partition=args.partition))
        print(f"wrote {args.slurm}: {len(recipes)} array tasks; submit with: sbatch {args.slurm}")
        return 0

    todo = [recipe for recipe in recipes if not is_finished(recipe, configs[recipe].weights_path.parent)]
    skipped = len(recipes) - len(todo)
    commands = [(recipe, train_command(recipe, args.overrides, launcher=[sys.executable])) for recipe in todo]
    if args.dry_run:
        for _recipe, command in commands:
            print(shlex.join(command))
        print(f"# {len(commands)} to run, {skipped} already finished", file=sys.stderr)
        return 0
    print(f"{len(commands)} recipes to train, {skipped} already finished")
    if args.in_process:
        failures = run_in_process(todo, args.overrides)
    else:
        failures = run_local(commands, logs=args.logs)
    if failures:
        raise CxrError(f"{failures} of {len(commands)} recipes failed; see the logs in {args.logs}")
    return 0


if __name__ == "__main__":
    run_cli(main)
