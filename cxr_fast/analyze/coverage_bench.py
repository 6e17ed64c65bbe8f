"""Do the report's 95% intervals cover? A coverage study on clustered patients with a known truth.

    python -m cxr_fast.analyze.coverage_bench [--replicates 1000 --bootstrap 1000]

Each replicate draws a task population: a group of n patients (60, 120, 600 or 3,000) and 600
other patients. A patient has 1 + Poisson(1.5) images (2.5 on average, as MIMIC's test set);
a patient effect raises the chance of a positive label on all their images, another moves
all their scores, and an image effect shared by the two models makes their errors coincide.
The group's positives score lower (the models miss more of them), so its gaps are not zero.
The truth is the superpopulation value, computed once per cell on 2 million images.

Every replicate runs the report's own arithmetic on the report's own resamples (subject
weights, the AUROC kernel and the weighted tallies of cxr_fast.analyze.resampled, the
intervals of cxr_fast.analyze.bootstrap and the degrees of freedom and reliability rules of
cxr_fast.analyze.performance), and records whether the plain percentile interval (before) and the
report's interval (after: Wilson's for a proportion, the expanded percentile interval for the rest)
hold the truth, and whether the analysis would call that interval reliable. Written to
benchmarks/results/analyze-coverage-<machine>-<date>.json; the table in BENCHMARKS.md comes from it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import optimize

from cxr_fast.analyze.bootstrap import expanded_interval, percentile_interval, reliable, subject_weights
from cxr_fast.analyze.consistency import kappa_arrays, kappa_from_sums
from cxr_fast.analyze.inputs import TaskData
from cxr_fast.analyze.parallel import workers
from cxr_fast.analyze.performance import interval_sides, value_interval, value_reliable
from cxr_fast.analyze.resampled import Resampled, informative_patients, metric_values
from cxr_fast.io import write_json
from cxr_fast.metrics import METRICS, metric_matrix

RESULTS = Path("benchmarks/results")
GROUP_SIZES = (60, 120, 600, 3000)
PREVALENCES = (0.02, 0.10, 0.35)
REST_PATIENTS = 600
TRUTH_PATIENTS = 400_000  # per part (group, rest): about 1 million images each
METHODS = ("percentile", "report")

# The generative model (logit / score units).
LABEL_EFFECT = 1.0      # sd of the patient effect on the label's logit
SCORE_EFFECT = 0.8      # sd of the patient effect on both models' scores
SHARED_NOISE = 0.7      # sd of the image effect both models share (consistent errors)
MODEL_NOISE = 0.7       # sd of each model's own noise
SEPARATION = 1.8        # score of a positive minus a negative
THRESHOLD = 0.9         # pred = score >= THRESHOLD
GROUP_SHIFT = -0.5      # the group's positives score this much lower


def label_intercept(prevalence: float) -> float:
    """The label logit's intercept that gives `prevalence` positive images (Gauss-Hermite over
    the patient effect)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    share = lambda a: (weights / (1 + np.exp(-(a + LABEL_EFFECT * nodes)))).sum() - prevalence  # noqa: E731
    return float(optimize.brentq(share, -20, 10))


def draw_patients(rng: np.random.Generator, n_patients: int, *, intercept: float, shift: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(subject of each image, label, (2, images) scores) for n_patients clustered patients."""
    images = 1 + rng.poisson(1.5, n_patients)
    subject = np.repeat(np.arange(n_patients), images)
    label_effect, score_effect = rng.normal(size=(2, n_patients))
    label = rng.random(subject.size) < 1 / (1 + np.exp(-(intercept + LABEL_EFFECT * label_effect[subject])))
    shared = SEPARATION * label + shift * label + SCORE_EFFECT * score_effect[subject] + SHARED_NOISE * rng.normal(size=subject.size)
    return subject, label, shared[None] + MODEL_NOISE * rng.normal(size=(2, subject.size))


def draw_task(rng: np.random.Generator, n_group: int, *, intercept: float, n_rest: int = REST_PATIENTS) -> TaskData:
    """A task population, the group's images first; TaskData as the analysis builds it."""
    group = draw_patients(rng, n_group, intercept=intercept, shift=GROUP_SHIFT)
    rest = draw_patients(rng, n_rest, intercept=intercept, shift=0.0)
    score = np.concatenate([group[2], rest[2]], axis=1)
    return TaskData(task="coverage", archs=("a", "b"), recipes=("a", "b"), images=None, label=np.r_[group[1], rest[1]],
                    prob=1 / (1 + np.exp(-(score - THRESHOLD))), pred=score >= THRESHOLD,
                    subject_index=np.r_[group[0], rest[0] + n_group])


STATISTICS = ("auroc", "sensitivity", "specificity", "balanced_accuracy", "ppv", "npv", "gap_fnr", "gap_fpr",
              "gap_balanced_accuracy", "gap_auroc", "kappa", "gap_kappa")
# The gaps to overall of the metrics that raise flags (performance.FLAG_METRICS).
GAPS = {"gap_fnr": "fnr", "gap_fpr": "fpr", "gap_balanced_accuracy": "balanced_accuracy", "gap_auroc": "auroc"}


@dataclass(frozen=True)
class Statistic:
    """One statistic of one replicate: its row (estimate, then resamples), the patients its
    t quantile counts, its informative patients and whether the report calls it reliable."""

    row: np.ndarray
    t_patients: float
    informative: float
    reliable: bool


def statistics(resampled: Resampled) -> dict[str, Statistic]:
    """The group's statistics of model 0 (and the models' kappa), as the subgroup table
    computes them (performance.py)."""
    overall, by_group = metric_values(resampled)
    informative = informative_patients(resampled.tallies)[0]      # model 0: (scope, K); scope 1 = the group
    group, everybody = by_group[0, 0], overall[0]                 # (K, 1 + R)
    patients, _ = interval_sides(group[None], everybody, informative[1][None], informative[0])
    value_ok = value_reliable(informative[1])
    at = {name: METRICS.index(name) for name in METRICS}
    result = {name: Statistic(group[at[name]], float(patients["group"][0, at[name]]), float(informative[1, at[name]]),
                              bool(value_ok[at[name]])) for name in STATISTICS[:6]}
    for gap, metric in GAPS.items():
        result[gap] = Statistic(group[at[metric]] - everybody[at[metric]], float(patients["gap_overall"][0, at[metric]]),
                                float(informative[1, at[metric]]), bool(reliable(informative[1, at[metric]])))
    tallies = resampled.tallies
    kappa = [kappa_from_sums(tallies.positives[s] + tallies.negatives[s], tallies.correct[:, s].T,
                             tallies.agreeing[s])["kappa"][:, 0] for s in (0, 1)]
    erring = float(tallies.patients["erring"][1])
    result["kappa"] = Statistic(kappa[1], erring, erring, bool(reliable(erring)))
    result["gap_kappa"] = Statistic(kappa[1] - kappa[0], erring, erring, bool(reliable(erring)))
    return result


def truth(prevalence: float, n_group: int, *, seed: int, n_rest: int = REST_PATIENTS,
          n_patients: int = TRUTH_PATIENTS) -> dict[str, float]:
    """The superpopulation value of every statistic: the group and the rest drawn large, the
    overall weighted to the cell's mix of patients."""
    rng = np.random.default_rng([seed, 99])
    intercept = label_intercept(prevalence)
    parts = [draw_patients(rng, n_patients, intercept=intercept, shift=shift) for shift in (GROUP_SHIFT, 0.0)]
    label = np.r_[parts[0][1], parts[1][1]]
    score = np.concatenate([parts[0][2], parts[1][2]], axis=1)
    in_group = np.r_[np.ones(parts[0][1].size), np.zeros(parts[1][1].size)]
    share = n_group / (n_group + n_rest)   # both parts hold n_patients patients
    weights = np.stack([in_group, np.where(in_group == 1, share, 1 - share)])  # the group, the overall mix
    prob, pred = 1 / (1 + np.exp(-(score[0] - THRESHOLD))), score[0] >= THRESHOLD
    group, everybody = metric_matrix(weights, label, prob, pred)
    kappa = kappa_arrays(weights, (score >= THRESHOLD) == label[None])["kappa"][:, 0]
    at = {name: METRICS.index(name) for name in METRICS}
    result = {name: float(group[at[name]]) for name in STATISTICS[:6]}
    result |= {gap: float(group[at[metric]] - everybody[at[metric]]) for gap, metric in GAPS.items()}
    result |= {"kappa": float(kappa[0]), "gap_kappa": float(kappa[0] - kappa[1])}
    return result


def cell_groups(data: TaskData, n_group: int) -> list[tuple[str, str, np.ndarray]]:
    """The group and the rest: an attribute's groups partition the images, as iter_groups' do."""
    in_group = data.subject_index < n_group
    return [("cell", "group", np.flatnonzero(in_group)), ("cell", "rest", np.flatnonzero(~in_group))]


def run_cell(n_group: int, prevalence: float, *, replicates: int, bootstrap: int, seed: int = 0,
             truth_patients: int = TRUTH_PATIENTS) -> dict:
    """Coverage of every statistic and method in one (group size, prevalence) cell."""
    start = time.perf_counter()
    target = truth(prevalence, n_group, seed=seed, n_patients=truth_patients)
    rng = np.random.default_rng([seed, n_group, round(prevalence * 1000)])
    intercept = label_intercept(prevalence)
    tally = {name: {"defined": 0, "reliable": 0, **{f"covered_{m}": 0 for m in METHODS},
                    "covered_report_reliable": 0, "patients": [], "covered": []} for name in STATISTICS}
    for replicate in range(replicates):
        data = draw_task(rng, n_group, intercept=intercept)
        weights = subject_weights(n_subjects=data.n_subjects, n_resamples=bootstrap, seed=replicate, task=data.task)
        for name, statistic in statistics(Resampled(data=data, groups=cell_groups(data, n_group), weights=weights)).items():
            summary = cell_outcome(name, statistic, target[name])
            counts = tally[name]
            if summary["defined"]:
                counts["patients"].append(statistic.informative)
                counts["covered"].append(summary["covered_report"])
            for key, hit in summary.items():
                counts[key] += hit
    return {"group_patients": n_group, "prevalence": prevalence, "replicates": replicates,
            "seconds": round(time.perf_counter() - start, 1), "truth": target,
            "statistics": {name: summarize(counts, replicates) for name, counts in tally.items()}}


def report_interval(name: str, row: np.ndarray, patients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The report's interval of statistic `name` from its row (estimate, resamples) and the
    patients its t quantile counts: a value's as the model and subgroup tables make it
    (performance.value_interval), a gap's and a kappa's the expanded percentile interval."""
    if name in METRICS:
        return value_interval(row[:1], row[1:, None], patients, level=0.95, metrics=(name,))
    return expanded_interval(row[1:, None], patients)


def cell_outcome(name: str, statistic: Statistic, target: float) -> dict[str, bool]:
    """Whether the estimate is defined, the interval reliable, and each interval covers."""
    row = statistic.row
    outcome = {"defined": bool(np.isfinite(row[0])), "reliable": bool(np.isfinite(row[0]) and statistic.reliable)}
    for method, (low, high) in (("percentile", percentile_interval(row[1:, None])),
                                ("report", report_interval(name, row, np.array([statistic.t_patients])))):
        outcome[f"covered_{method}"] = bool(outcome["defined"] and low[0] <= target <= high[0])
    outcome["covered_report_reliable"] = outcome["reliable"] and outcome["covered_report"]
    return outcome


def summarize(counts: dict, replicates: int) -> dict[str, float]:
    """Coverage over the replicates where the statistic is defined (and, for the last, reliable)."""
    defined, reliable_count = counts["defined"], counts["reliable"]
    share = lambda hits, total: round(hits / total, 4) if total else None  # noqa: E731
    patients, covered = np.array(counts["patients"]), np.array(counts["covered"], bool)
    bins = np.digitize(patients, INFORMATIVE_BINS)
    return {"defined_share": round(defined / replicates, 4), "reliable_share": round(reliable_count / replicates, 4),
            "median_patients": float(np.median(patients)) if patients.size else None,
            # Coverage of the report's interval by informative patients: [replicates, covered] per bin.
            "report_by_patients": {_bin_name(b): [int((bins == b).sum()), int(covered[bins == b].sum())]
                                     for b in np.unique(bins)},
            "percentile": share(counts["covered_percentile"], defined),
            "report": share(counts["covered_report"], defined),
            "report_reliable": share(counts["covered_report_reliable"], reliable_count)}


INFORMATIVE_BINS = (2, 5, 10, 20, 50)  # lower ends: 0-1, 2-4, 5-9, 10-19, 20-49, 50+ informative patients


def _bin_name(index: int) -> str:
    ends = (0, *INFORMATIVE_BINS, None)
    return f"{ends[index]}+" if ends[index + 1] is None else f"{ends[index]}-{ends[index + 1] - 1}"


def pooled_by_patients(result: dict) -> dict[str, dict[str, float]]:
    """Coverage of the report's interval per informative-patient bin, every cell pooled: where
    the reliability rule (bootstrap.MIN_INFORMATIVE) has to draw its line."""
    pooled: dict[str, dict[str, list[int]]] = {}
    for cell in result["cells"]:
        for name, row in cell["statistics"].items():
            for bin_name, (n, hits) in row["report_by_patients"].items():
                total = pooled.setdefault(name, {}).setdefault(bin_name, [0, 0])
                total[0], total[1] = total[0] + n, total[1] + hits
    return {name: {b: round(hits / n, 3) for b, (n, hits) in sorted(bins.items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+")))}
            for name, bins in pooled.items()}


def markdown_table(result: dict) -> str:
    """Coverage per statistic, group size and prevalence: percentile (before) -> the report's
    interval (after, and over the replicates it calls reliable); `unreliable` where most are not."""
    lines = ["| statistic | patients | prevalence | defined | median informative patients | percentile (before) "
             "| report's (after) | after, reliable only | reliable |", "|---|---|---|---|---|---|---|---|---|"]
    for name in STATISTICS:
        for cell in result["cells"]:
            row = cell["statistics"][name]
            after = "unreliable" if row["reliable_share"] < 0.5 else _share(row["report_reliable"])
            lines.append(f"| {name} | {cell['group_patients']} | {cell['prevalence']:.0%} | {row['defined_share']:.0%} "
                         f"| {row['median_patients']:.0f} | {_share(row['percentile'])} | {_share(row['report'])} "
                         f"| {after} | {row['reliable_share']:.0%} |")
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_fast.analyze.coverage_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=1000, help="replicates per cell (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(GROUP_SIZES), help="group sizes in patients")
    parser.add_argument("--prevalences", type=float, nargs="+", default=list(PREVALENCES))
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes (default: %(default)s)")
    parser.add_argument("--name", default="", help="a suffix for the JSON's name (runs of other cells on one day)")
    args = parser.parse_args(argv)
    steal_before, start = _cpu_jiffies(), time.perf_counter()
    cells = [(size, prevalence) for size in sorted(args.sizes, reverse=True) for prevalence in args.prevalences]
    with ProcessPoolExecutor(workers()) as pool:  # the largest cells first: they take longest
        futures = [pool.submit(run_cell, size, prevalence, replicates=args.replicates, bootstrap=args.bootstrap)
                   for size, prevalence in cells]
        results = sorted((future.result() for future in futures), key=lambda c: (c["group_patients"], c["prevalence"]))
    result = {
        "benchmark": "analyze-coverage",
        "command": " ".join(["python -m cxr_fast.analyze.coverage_bench", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(), "cpu_count": os.cpu_count(), "workers": workers(),
        "wall_s": round(time.perf_counter() - start, 1), "steal_share": _steal_share(steal_before, _cpu_jiffies()),
        "bootstrap": args.bootstrap, "rest_patients": REST_PATIENTS, "level": 0.95, "cells": results,
    }
    result["report_by_patients"] = pooled_by_patients(result)
    suffix = f"-{args.name}" if args.name else ""
    path = Path(args.results) / f"analyze-coverage-{platform.node()}-{datetime.date.today().isoformat()}{suffix}.json"
    write_json(path, result)
    print(markdown_table(result))
    print(path)
    return 0


def _cpu_jiffies() -> tuple[int, int] | None:
    from cxr_fast.analyze.scale_bench import _cpu_jiffies as jiffies

    return jiffies()


def _steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if not (before and after):
        return None
    return round((after[0] - before[0]) / max(after[1] - before[1], 1), 3)


if __name__ == "__main__":
    from cxr_fast.errors import run_cli

    run_cli(main)
