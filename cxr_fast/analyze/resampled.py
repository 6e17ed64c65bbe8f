"""One task's arrays and bootstrap weights, built once and shared by every table, and the two
kernels that make the study-sized analysis seconds of arithmetic instead of minutes.

Weights live per *subject* (bootstrap.subject_weights): an image's weight is its subject's
count, so a weighted sum over a group's images is (subject weights) @ (per-subject sums of the
group's indicators), a float32 matrix product over the group's patients. Counts are small
integers, so these sums are exact and equal, bit for bit, the image-level products of
metrics.metric_matrix.

AUROC is not a sum of indicators: auroc_kernel walks each model's images once in score order
and keeps every group's running negative weight for all resamples at once. Models run in
threads (the kernel releases the GIL).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
from scipy import sparse

from cxr_fast.analyze.auroc_kernel import scope_auroc
from cxr_fast.analyze.bootstrap import subject_weights
from cxr_fast.analyze.groups import iter_groups
from cxr_fast.analyze.inputs import TaskData, task_data
from cxr_fast.analyze.parallel import workers
from cxr_fast.metrics import METRICS, metrics_from_confusion


@dataclass(frozen=True)
class Tallies:
    """Weighted counts of every scope (0 = everybody, then each group) in every resample row
    (0 = the point estimate): the sums the confusion metrics and the kappas are made of."""

    positives: np.ndarray        # (S, 1 + R)
    negatives: np.ndarray        # (S, 1 + R)
    true_positives: np.ndarray   # (M, S, 1 + R)
    false_positives: np.ndarray  # (M, S, 1 + R)
    agreeing: np.ndarray         # (S, 1 + R, P): both right or both wrong, per model pair (pairs() order)
    patients: dict[str, np.ndarray]  # patients in each scope who carry a metric (informative_patients)

    @property
    def correct(self) -> np.ndarray:
        """(M, S, 1 + R) right answers: true positives plus true negatives."""
        return self.true_positives + (self.negatives - self.false_positives)


@dataclass(frozen=True)
class Resampled:
    """A task's data, its groups (attribute, group, image positions) and its (1 + R, n_subjects)
    int32 subject weights (row 0 = the point estimate)."""

    data: TaskData
    groups: list[tuple[str, str, np.ndarray]]
    weights: np.ndarray

    @property
    def scopes(self) -> list[np.ndarray]:
        """Image positions of scope 0 (everybody), then of each group."""
        return [np.arange(self.data.label.size)] + [positions for _, _, positions in self.groups]

    @functools.cached_property
    def tallies(self) -> Tallies:
        """Computed once, on first use, for the metrics and the kappas alike: one pass per
        scope over its patients (one weight gather, one product for every column)."""
        data, n_models = self.data, len(self.data.archs)
        first, second = pairs(n_models)
        weights = self.weights.astype(np.float32)
        per_scope, patients = [], []
        for positions in self.scopes:
            label, pred = data.label[positions], data.pred[:, positions]
            correct = pred == label
            indicators = np.empty((positions.size, 2 + 2 * n_models + first.size), np.float32)
            indicators[:, 0], indicators[:, 1] = label, ~label
            indicators[:, 2:2 + n_models] = (label & pred).T
            indicators[:, 2 + n_models:2 + 2 * n_models] = (~label & pred).T
            indicators[:, 2 + 2 * n_models:] = (correct[first] == correct[second]).T
            subjects, by_subject = subject_sums(data.subject_index, positions, indicators)
            per_scope.append(weighted_sums(weights, subjects, by_subject))
            patients.append(_patients_carrying(by_subject, n_models))
        sums = np.stack(per_scope)  # (S, 1 + R, Q)
        return Tallies(positives=sums[:, :, 0], negatives=sums[:, :, 1],
                       true_positives=np.moveaxis(sums[:, :, 2:2 + n_models], 2, 0),
                       false_positives=np.moveaxis(sums[:, :, 2 + n_models:2 + 2 * n_models], 2, 0),
                       agreeing=sums[:, :, 2 + 2 * n_models:],
                       patients={name: np.stack([counts[name] for counts in patients], axis=-1) for name in patients[0]})


def _patients_carrying(by_subject: np.ndarray, n_models: int) -> dict[str, np.ndarray]:
    """From one scope's per-patient sums (label, ~label, TP per model, FP per model, ...): how
    many patients have a positive image, a negative one, and per model a predicted positive
    or a predicted negative, and an image some model gets wrong. These are the clusters each
    number rests on (informative_patients)."""
    positive, negative = by_subject[:, 0], by_subject[:, 1]
    tp, fp = by_subject[:, 2:2 + n_models], by_subject[:, 2 + n_models:2 + 2 * n_models]
    fn, tn = positive[:, None] - tp, negative[:, None] - fp
    return {"positive": (positive > 0).sum(), "negative": (negative > 0).sum(),
            "predicted_positive": (tp + fp > 0).sum(axis=0), "predicted_negative": (fn + tn > 0).sum(axis=0),
            "erring": (fn + fp > 0).any(axis=1).sum()}


def informative_patients(tallies: Tallies) -> np.ndarray:
    """(M, S, K) for every model, scope and METRIC the patients its value, and its gap between
    groups, rest on: those in the metric's denominator (with a positive image for
    sensitivity/FNR, a negative one for specificity/FPR, a predicted positive / negative for
    PPV / NPV), the fewer of the patients with a positive and with a negative image for AUROC,
    balanced accuracy and prevalence. Their count sets the t quantile of the expanded
    interval (balanced accuracy and the gaps combine their parts' counts:
    performance.t_patients, bootstrap.satterthwaite_patients), the reliability rule
    (performance.value_reliable) and the effective sample size a proportion's Wilson interval
    falls back to (bootstrap.wilson_interval).

    Not the patients with the rarer outcome (min(TP, FN) for sensitivity): that count moves
    with the estimate, so marking its small values unreliable kept the intervals whose estimate
    lay near the middle, and with it as degrees of freedom sensitivity, PPV and NPV covered
    0.97-0.99 where it was 10-20 (BENCHMARKS.md, DECISIONS.md)."""
    patients = tallies.patients
    n_models = patients["predicted_positive"].shape[0]
    per_scope = lambda counts: np.broadcast_to(counts, (n_models, counts.size))  # noqa: E731
    both = per_scope(np.minimum(patients["positive"], patients["negative"]))
    columns = {"prevalence": both, "auroc": both, "balanced_accuracy": both,
               "sensitivity": per_scope(patients["positive"]), "fnr": per_scope(patients["positive"]),
               "specificity": per_scope(patients["negative"]), "fpr": per_scope(patients["negative"]),
               "ppv": patients["predicted_positive"], "npv": patients["predicted_negative"]}
    return np.stack([columns[name] for name in METRICS], axis=-1)


def pairs(n_models: int) -> tuple[np.ndarray, np.ndarray]:
    """The model pairs (first, second) in itertools.combinations order."""
    first, second = np.triu_indices(n_models, k=1)
    return first, second


def resampled_tasks(*, predictions: pd.DataFrame | None = None, tasks: list[TaskData] | None = None,
                    n_bootstrap: int, seed: int) -> Iterator[Resampled]:
    """One Resampled per task, built lazily so only one task's weights are in memory at a time."""
    for data in (tasks if tasks is not None else task_data(predictions)):
        yield resample(data, n_bootstrap=n_bootstrap, seed=seed)


def resample(data: TaskData, *, n_bootstrap: int, seed: int) -> Resampled:
    """A task's groups and its subject weights (the same draws for any caller: seeded by task)."""
    return Resampled(data=data, groups=list(iter_groups(data.images)),
                     weights=subject_weights(n_subjects=data.n_subjects, n_resamples=n_bootstrap, seed=seed, task=data.task))


def scope_sums(weights: np.ndarray, subject_index: np.ndarray, positions: np.ndarray, indicators: np.ndarray) -> np.ndarray:
    """(1 + R, Q) weighted sums over the images at `positions` of the (len(positions), Q)
    0/1 (or small integer) `indicators`: per-subject sums, then one float32 product."""
    return weighted_sums(weights, *subject_sums(subject_index, positions, indicators))


def subject_sums(subject_index: np.ndarray, positions: np.ndarray, indicators: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The subjects of the images at `positions` and the (subjects, Q) sums of their indicators."""
    subjects, inverse = np.unique(subject_index[positions], return_inverse=True)
    by_subject = sparse.csr_matrix((np.ones(positions.size, np.float32), (inverse, np.arange(positions.size))),
                                   shape=(subjects.size, positions.size)) @ indicators.astype(np.float32, copy=False)
    return subjects, np.asarray(by_subject)


def weighted_sums(weights: np.ndarray, subjects: np.ndarray, by_subject: np.ndarray) -> np.ndarray:
    """(1 + R, Q): the subjects' weights in every resample times their per-subject sums."""
    # Every subject (scope 0): the weights as they are, no gathered copy.
    scope_weights = weights if subjects.size == weights.shape[1] else weights[:, subjects]
    return (scope_weights.astype(np.float32, copy=False) @ by_subject).astype(np.float64)


def metric_values(resampled: Resampled) -> tuple[np.ndarray, np.ndarray]:
    """Every METRIC of every model, overall (M, K, 1 + R) and per group (M, G, K, 1 + R);
    resample 0 is the point estimate. Equals metrics.metric_matrix on the image weights."""
    tallies = resampled.tallies
    tp, fp = tallies.true_positives, tallies.false_positives                                 # (M, S, R)
    values = metrics_from_confusion(tp, tallies.positives - tp, fp, tallies.negatives - fp, _auroc(resampled))  # (M, S, R, K)
    values = np.moveaxis(values, 3, 2)
    return values[:, 0], values[:, 1:]


def _auroc(resampled: Resampled) -> np.ndarray:
    """(M, 1 + G, 1 + R) AUROC overall (scope 0) and per group, one walk per model."""
    data = resampled.data
    scopes = _scope_codes(data.label.size, resampled.groups)
    weights_t = np.ascontiguousarray(resampled.weights.T)

    def one_model(m: int) -> np.ndarray:
        return scope_auroc(score=data.prob[m], label=data.label, subject_index=data.subject_index, scopes=scopes,
                           n_scopes=1 + len(resampled.groups), subject_weights_t=weights_t)

    with ThreadPoolExecutor(max_workers=workers()) as pool:
        return np.stack(list(pool.map(one_model, range(len(data.archs)))))


def _scope_codes(n_images: int, groups: list[tuple[str, str, np.ndarray]]) -> np.ndarray:
    """(1 + attributes, images) scope of each image: row 0 all 0 (everybody), then per
    attribute the number 1 + g of its group in `groups` (each attribute's groups partition
    the images)."""
    attributes = list(dict.fromkeys(attribute for attribute, _, _ in groups))
    scopes = np.zeros((1 + len(attributes), n_images), dtype=np.int64)
    for g, (attribute, _, positions) in enumerate(groups, start=1):
        scopes[1 + attributes.index(attribute), positions] = g
    return scopes
