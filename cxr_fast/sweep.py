"""The study runner: train every selected recipe on this machine, or write a Slurm array.

    python -m cxr_fast.sweep --tasks all --archs all                 # 114 recipes
    python -m cxr_fast.sweep --tasks effusion,edema --archs 'convnext_*' epochs=100
    python -m cxr_fast.sweep --tasks all --archs all --dry-run       # print the commands
    python -m cxr_fast.sweep --tasks all --archs all --slurm study.sbatch
    python -m cxr_fast.sweep --tasks all --archs all --plan [--throughput FILE] [--slurm study.sbatch]

One run per visible GPU at a time (sequentially on a CPU). A recipe whose
`weights/<recipe>/status.json` says finished is skipped; an interrupted one resumes, since
rerunning the training command resumes from `last.pt`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

from cxr_fast.errors import CxrError, one_line, run_cli
from cxr_fast.io import atomic_path
from cxr_fast.locks import describe, lock_holder
from cxr_fast.models import list_archs
from cxr_fast.recipes import Config, load_config, parse_overrides, recipe_name
from cxr_fast.same_run import is_finished
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


def running_holder(config: Config) -> str | None:
    """`running (held by pid 12 on node3, Slurm job 77_4, ...)` while a live run holds the
    recipe's lock, else None."""
    holder = lock_holder(config.weights_path)
    return None if holder is None else f"running (held by {describe(holder)})"


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
    with children_stopped_on_signal(running):
        while queue or running:
            failures += _run_step(slots, running, queue, logs)
            time.sleep(0.5)
    return failures


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def children_stopped_on_signal(running: dict):
    """SIGTERM/SIGINT stop the sweep and its running trainings with it: the signal is passed
    on to each child and waited for (a trainer left behind would keep a GPU, and its recipe's
    lock, after the sweep is gone); then the sweep exits with 128 + the signal number."""
    def stop(signum, _frame):
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except Stopped as stopped:
        for signum in previous:  # a second signal must not cut the wait short
            signal.signal(signum, signal.SIG_IGN)
        for recipe, process in running.values():
            process.send_signal(stopped.signum)
        for recipe, process in running.values():
            process.wait()
            print(f"stopped {recipe} ({stopped})", flush=True)
        print(f"sweep stopped by {stopped}", file=sys.stderr, flush=True)
        raise SystemExit(128 + stopped.signum) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_step(slots: list, running: dict, queue: list, logs: Path) -> int:
    """Start commands on free slots, collect finished ones; return how many failed."""
    failures = 0
    for slot in [slot for slot in slots if slot not in running and queue]:
        recipe, command = queue.pop(0)
        env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {})
        log = open(logs / f"{recipe}.log", "a")
        # The same job header as the Slurm script's: `--status` reads the latest job's errors.
        log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: {recipe}"
                  f" (GPUs: {slot if slot is not None else 'none'})\n")
        log.flush()
        print(f"start {recipe}" + (f" on GPU {slot}" if slot is not None else ""), flush=True)
        running[slot] = (recipe, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()  # the child holds its own copy of the descriptor
    for slot, (recipe, process) in list(running.items()):
        if process.poll() is not None:
            del running[slot]
            failures += process.returncode != 0
            print(f"{'done' if process.returncode == 0 else f'FAILED ({process.returncode})'} {recipe}"
                  f"  (log: {logs / f'{recipe}.log'})", flush=True)
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


def launcher(gpus_per_task: int, cpus_per_task: int) -> list[str]:
    """The interpreter that writes the script, by absolute path (no venv activation on the node),
    plus `accelerate launch` with every parameter given for more than one GPU (no warnings about
    defaults). The train config sets its own precision; the launcher's `no` does not override it."""
    python = [str(Path(sys.executable).absolute())]
    if gpus_per_task <= 1:
        return python
    return [*python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus_per_task),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", str(max(1, cpus_per_task // gpus_per_task))]


def slurm_script(recipes: list[str], overrides: list[str], *, logs: Path, gpus_per_task: int, cpus_per_task: int,
                 time_limit: str, partition: str) -> str:
    """An sbatch array: task i trains recipe i, unless it is finished or another job trains it.

    Paths are absolute (the project sits on a shared filesystem); each recipe appends to
    `<logs>/<recipe>.log`, which starts every job with its node and GPUs."""
    python = shlex.quote(str(Path(sys.executable).absolute()))
    log_dir = str(logs.absolute())  # #SBATCH lines are not shell-parsed: written as is
    logs = shlex.quote(log_dir)
    recipe_lines = "\n".join(shlex.quote(recipe) for recipe in recipes)
    settings = "".join(f" {shlex.quote(item)}" for item in overrides)
    train = shlex.join([*launcher(gpus_per_task, cpus_per_task), "-m", "cxr_fast.train"])
    optional = (f"#SBATCH --gres=gpu:{gpus_per_task}\n" if gpus_per_task > 0 else "") + \
               (f"#SBATCH --partition={partition}\n" if partition else "")
    return f"""#!/bin/bash
#SBATCH --job-name=cxr_fast
#SBATCH --array=0-{len(recipes) - 1}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time_limit}
#SBATCH --output={log_dir}/slurm-%A_%a.log
{optional}# Written by `python -m cxr_fast.sweep --slurm`. Resubmit this file as is: finished recipes
# are skipped, interrupted ones resume from weights/<recipe>/last.pt, and a recipe that another
# job still trains is skipped.
set -euo pipefail
cd {shlex.quote(str(Path.cwd()))}
RECIPES=(
{recipe_lines}
)
RECIPE=${{RECIPES[$SLURM_ARRAY_TASK_ID]}}
LOG={logs}/"$RECIPE".log
echo "$RECIPE: log in $LOG"
exec >>"$LOG" 2>&1
echo "== $(date '+%F %T') Slurm job ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}} on $(hostname): $RECIPE"
echo "GPUs: ${{CUDA_VISIBLE_DEVICES:-none}}"
if [ -n "${{CUDA_VISIBLE_DEVICES:-}}" ] && command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; fi
if HOLDER=$({python} -m cxr_fast.sweep --is-running "$RECIPE"{settings}); then
  echo "$RECIPE: skipped, $HOLDER"; exit 0
fi
if {python} -m cxr_fast.sweep --is-finished "$RECIPE"{settings}; then
  echo "$RECIPE: already finished"; exit 0
fi
{train} --recipe "$RECIPE" --no-progress{settings}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_fast.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="all", help="all, or a comma list of task slugs/indices")
    parser.add_argument("--archs", default="all", help="all (the 19 study archs), or a comma list of slugs/wildcards")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--status", action="store_true",
                        help="print where each selected recipe stands (state, epochs, best epoch, time left)")
    parser.add_argument("--json", action="store_true", help="with --status: JSON for scripts")
    parser.add_argument("--as-requested", action="store_true",
                        help="with --status: judge each saved run against the settings given here (what this sweep "
                             "would still train), not against the run's own saved settings (the default)")
    parser.add_argument("--slurm", type=Path, metavar="FILE", help="write an sbatch --array script instead of running")
    parser.add_argument("--gpus-per-task", type=int, default=1, help="with --slurm (default 1; 0: CPU jobs)")
    parser.add_argument("--cpus-per-task", type=int, default=0, help="with --slurm (default 8 per GPU, 8 for CPU jobs)")
    parser.add_argument("--time", help="with --slurm: time limit per recipe (default 48:00:00; with --plan: "
                                       "the longest recipe's estimate + 25%%)")
    parser.add_argument("--plan", action="store_true",
                        help="print images per epoch, validation images and hours (on the device the throughput "
                             "was measured on, named) per recipe and in total")
    parser.add_argument("--throughput", type=Path, metavar="FILE",
                        help="with --plan: a bench results file (default: the newest in benchmarks/results for this device)")
    parser.add_argument("--partition", default="", help="with --slurm")
    parser.add_argument("--logs", type=Path, default=Path("runs/sweep"), help="one log per recipe (default runs/sweep)")
    parser.add_argument("--in-process", action="store_true",
                        help="train one recipe after another in this process (CPU; no per-recipe start-up)")
    parser.add_argument("--is-finished", metavar="RECIPE",
                        help="exit 0 if RECIPE needs no more epochs for these settings, else 1")
    parser.add_argument("--is-running", metavar="RECIPE",
                        help="exit 0 and say who trains RECIPE if a live run holds its lock, else 1")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every recipe")
    args = parser.parse_intermixed_args(argv)
    settings = parse_overrides(args.overrides)
    if args.is_finished:
        return 0 if is_finished(load_config(args.is_finished, settings)) else 1
    if args.is_running:
        holder = running_holder(load_config(args.is_running, settings))
        if holder:
            print(holder)
        return 0 if holder else 1

    recipes = [recipe_name(task, arch) for arch in select_archs(args.archs) for task in select_tasks(args.tasks)]
    configs = {recipe: load_config(recipe, settings) for recipe in recipes}  # validate everything up front

    if args.status:
        from cxr_fast.study_status import print_status

        print_status(list(configs.values()), logs=args.logs, as_json=args.json, as_requested=args.as_requested)
        return 0
    if args.plan:
        from cxr_fast.study_plan import format_plan, slurm_time, study_plan

        plans, source, device = study_plan(list(configs.values()), throughput=args.throughput)
        print(format_plan(plans, source, device))
        if args.slurm and not args.time:
            args.time = slurm_time(plans)
            print(f"--time {args.time}: the longest recipe + 25%" if args.time
                  else "--time 48:00:00: some recipe has no throughput measurement to size it")
    if args.slurm:
        return write_slurm(args, recipes)
    if args.plan:
        return 0

    todo = [recipe for recipe in recipes if not is_finished(configs[recipe])]
    skipped = len(recipes) - len(todo)
    commands = [(recipe, train_command(recipe, args.overrides, launcher=[sys.executable])) for recipe in todo]
    if args.dry_run:
        for _recipe, command in commands:
            print(shlex.join(command))
        print(f"# {len(commands)} to run, {skipped} already finished", file=sys.stderr)
        return 0
    print(f"{len(commands)} recipes to train, {skipped} already finished")
    unavailable = without_pretrained_weights([configs[recipe] for recipe in todo])
    for recipe, message in unavailable.items():
        print(f"FAILED {recipe}: {message}", flush=True)
    failures = len(unavailable)
    if args.in_process:
        failures += run_in_process([recipe for recipe in todo if recipe not in unavailable], args.overrides)
    else:
        failures += run_local([item for item in commands if item[0] not in unavailable], logs=args.logs)
    if failures:
        where = "the FAILED lines above" + ("" if args.in_process else f" and the logs in {args.logs}")
        raise CxrError(f"{failures} of {len(commands)} recipes failed; see {where}")
    return 0


def without_pretrained_weights(configs: list[Config]) -> dict[str, str]:
    """{recipe: the one-line reason} for the recipes that cannot get their pretrained weights:
    the hub, asked once for the whole sweep, cannot be reached and they are not cached. They
    fail here, without starting a run each; the runs started inherit offline mode."""
    wanting = [config for config in configs if config.pretrained and not config.pretrained_file]
    if not wanting:
        return {}
    from cxr_fast.hub import offline_reason, require_pretrained
    from cxr_fast.models import get_arch

    reason = offline_reason()
    if not reason:
        return {}
    print(f"the Hugging Face hub cannot be reached ({reason}): pretrained recipes whose weights are not "
          "cached fail at once (or give pretrained=false)", flush=True)
    unavailable = {}
    for config in wanting:
        try:
            require_pretrained(get_arch(config.arch).timm_name)
        except CxrError as error:
            unavailable[config.recipe] = str(error)
    return unavailable


def write_slurm(args: argparse.Namespace, recipes: list[str]) -> int:
    if args.gpus_per_task < 0 or args.cpus_per_task < 0:
        raise CxrError("--gpus-per-task and --cpus-per-task: expected 0 or more")
    cpus = args.cpus_per_task or 8 * max(1, args.gpus_per_task)
    try:  # Slurm does not create the folder of --output; a job that cannot open its log dies without one
        args.logs.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CxrError(f"{args.logs}: cannot create the log folder ({one_line(error)})") from error
    with atomic_path(args.slurm) as tmp:
        tmp.write_text(slurm_script(recipes, args.overrides, logs=args.logs, gpus_per_task=args.gpus_per_task,
                                    cpus_per_task=cpus, time_limit=args.time or "48:00:00", partition=args.partition))
    print(f"wrote {args.slurm}: {len(recipes)} array tasks, logs in {args.logs}/; submit with: sbatch {args.slurm}")
    return 0


if __name__ == "__main__":
    run_cli(main)
