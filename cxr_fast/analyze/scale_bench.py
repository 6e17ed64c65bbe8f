"""The analysis at the study's size: wall time and peak memory of `python -m cxr_fast.analyze`.

    python -m cxr_fast.analyze.scale_bench [--images 32424 --subjects 13000 --archs 19 --bootstrap 1000]

Simulates `all_pred/` at that size (19 archs x 6 tasks = 114 prediction files by default,
cached in build/bench/ under a name that spells the size) with images for the report's gallery
(a small shard set and heatmaps, scale_images.py), runs the analysis CLI in a child
process and records its wall time, its peak resident memory (the child's ru_maxrss) and the
size of every report file in benchmarks/results/analyze-scale-<machine>-<date>.json.
The child runs as a user would run it, so the numbers include reading the files and writing
the report, and its worker processes (the statsmodels fits, the figures) are counted in the
summed memory. On a virtual machine the hypervisor may take CPU time away (steal); its share
during the run is recorded beside the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from cxr_fast.io import write_json

RESULTS = Path("benchmarks/results")
ARCH_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "densenet121", "densenet169", "densenet201",
              "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "convnext_tiny",
              "convnext_small", "convnext_base", "vit_small", "vit_base", "swin_tiny", "swin_small", "regnety_016")


PLANTED = dict(attribute="sex x race", group="F & Black", tasks=("effusion",))
PLANTED_NAME = "effusion-F-Black"  # in the cache folder's name: another plant is another folder


def simulated_pred_dir(*, images: int, subjects: int, archs: int, seed: int = 0, cache: Path = Path("build/bench")) -> Path:
    """A cached simulated all_pred/ of the requested size with one planted intersection, as
    in the study: effusion positives of women who are Black missed by every model."""
    from cxr_fast.analyze.simulate import PlantedMiss, simulate_predictions, write_prediction_files
    from cxr_fast.tasks import TASKS

    pred_dir = cache / f"analyze-pred-{images}i-{subjects}s-{archs}a-seed{seed}-{PLANTED_NAME}"
    done = pred_dir / ".complete"
    if done.exists():
        return pred_dir
    names = ARCH_NAMES[:archs] if archs <= len(ARCH_NAMES) else tuple(f"arch{i:02d}" for i in range(archs))
    predictions = simulate_predictions(tasks=TASKS, archs=names, n_images=images, images_per_subject=images / subjects,
                                       planted=PlantedMiss(**PLANTED), seed=seed)
    write_prediction_files(predictions=predictions, pred_dir=pred_dir)
    done.write_text("")
    return pred_dir


def measure(*, pred_dir: Path, out: Path, bootstrap: int, images: tuple[Path, Path] | None = None) -> dict:
    """Run the analysis CLI once in a child process: wall seconds, the peak of
    the summed resident memory of it and its worker processes, the share of CPU time the
    hypervisor took away (steal) meanwhile, and every report file's size."""
    command = [sys.executable, "-m", "cxr_fast.analyze", "--pred-dir", str(pred_dir), "--out", str(out),
               "--bootstrap", str(bootstrap)]
    if images:  # the gallery: thumbnails from these shards, heatmaps from this folder
        command += ["--shards", str(images[0]), "--explain-dir", str(images[1])]
    steal_before = _cpu_jiffies()
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    peak_tree = 0
    while child.poll() is None:
        peak_tree = max(peak_tree, _tree_rss_kib(child.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command)
    steal_after = _cpu_jiffies()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "command": " ".join(["python"] + command[1:]),
        "wall_s": round(wall, 2),
        # RUSAGE_CHILDREN: the largest peak of any one process (the analysis itself).
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "report_files_mb": {path.name: round(path.stat().st_size / 2**20, 2) for path in sorted(out.iterdir())},
    }
    if peak_tree:
        result["peak_tree_rss_mb"] = round(peak_tree / 1024, 1)  # all its processes together, sampled every 0.1 s
    if steal_before and steal_after:
        (steal0, total0), (steal1, total1) = steal_before, steal_after
        result["steal_share"] = round((steal1 - steal0) / max(total1 - total0, 1), 3)
    return result


def _cpu_jiffies() -> tuple[int, int] | None:
    """(steal, total) CPU time of the machine from /proc/stat (Linux; None elsewhere)."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def _tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc; 0 elsewhere)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # the process ended meanwhile
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_fast.analyze.scale_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32_424, help="test images per task (default: %(default)s)")
    parser.add_argument("--subjects", type=int, default=13_000, help="patients (default: %(default)s)")
    parser.add_argument("--archs", type=int, default=19, help="models per task (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--out", default="build/bench/analyze-report", help="report directory (default: %(default)s)")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes (default: %(default)s)")
    args = parser.parse_args(argv)
    pred_dir = simulated_pred_dir(images=args.images, subjects=args.subjects, archs=args.archs)
    from cxr_fast.analyze.scale_images import study_images

    gallery = study_images(pred_dir, pred_dir.parent)
    result = {
        "benchmark": "analyze-scale",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(), "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(),
        "images_per_task": args.images, "subjects": args.subjects, "models": 6 * args.archs, "bootstrap": args.bootstrap,
        "gallery": "thumbnails from a shard set of 64 distinct 256 px phantom images covering every key, "
                   "3 models' heatmaps per image (cxr_fast/analyze/scale_images.py)",
        **measure(pred_dir=pred_dir, out=Path(args.out), bootstrap=args.bootstrap, images=gallery),
        "load_average_end": os.getloadavg(),
    }
    path = Path(args.results) / f"analyze-scale-{platform.node()}-{datetime.date.today().isoformat()}.json"
    write_json(path, result)
    print(json.dumps(result, indent=1))
    print(path)
    return 0


if __name__ == "__main__":
    from cxr_fast.errors import run_cli

    run_cli(main)
