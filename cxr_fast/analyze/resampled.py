"""One task's arrays and bootstrap weights, built once and shared by every table, and the two
kernels that make the study-sized analysis seconds of arithmetic instead of minutes.

Weights live per *subject* (bootstrap.subject_weights): an image's weight is its subject's
count, so a weighted sum over a group's images is (subject weights) @ (per-subject sums of the
group's indicators), a float32 matrix product over the group's patients. Counts are small
integers, so these sums are exact and equal, bit for bit, the image-level products of
metrics.metric_matrix.

AUROC is not a sum of indicators. For each model and attribute the negatives are sorted once
by (group, score); one integer cumulative sum of their weights then gives every positive its
credit (weight of its group's negatives scoring below it, ties counted half) in every resample.
Done over blocks of resamples laid out (images, resamples) so the working set stays in cache,
and over models in threads: numpy releases the GIL inside these loops.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
from scipy import sparse

from cxr_fast.analyze.bootstrap import subject_weights
from cxr_fast.analyze.groups import iter_groups
from cxr_fast.analyze.inputs import TaskData, task_data
from cxr_fast.metrics import metrics_from_confusion

RESAMPLE_BLOCK = 16  # resamples per AUROC block: (16 x images) int32 rows stay in cache (measured: 16 beats 32, 64, 128)


@dataclass(frozen=True)
class Resampled:
    """A task's data, its groups (attribute, group, image positions) and its (1 + R, n_subjects)
    int32 subject weights (row 0 = the point estimate)."""

    data: TaskData
    groups: list[tuple[str, str, np.ndarray]]
    weights: np.ndarray


def resampled_tasks(*, predictions: pd.DataFrame | None = None, tasks: list[TaskData] | None = None,
                    n_bootstrap: int, seed: int) -> Iterator[Resampled]:
    """One Resampled per task, built lazily so only one task's weights are in memory at a time."""
    for data in (tasks if tasks is not None else task_data(predictions)):
        yield Resampled(data=data, groups=list(iter_groups(data.images)),
                        weights=subject_weights(n_subjects=data.n_subjects, n_resamples=n_bootstrap, seed=seed, task=data.task))


def workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


def scope_sums(weights: np.ndarray, subject_index: np.ndarray, positions: np.ndarray, indicators: np.ndarray) -> np.ndarray:
    """(1 + R, Q) weighted sums over the images at `positions` of the (len(positions), Q)
    0/1 (or small integer) `indicators`: per-subject sums, then one float32 product."""
    subjects, inverse = np.unique(subject_index[positions], return_inverse=True)
    by_subject = sparse.csr_matrix((np.ones(positions.size, np.float32), (inverse, np.arange(positions.size))),
                                   shape=(subjects.size, positions.size)) @ indicators.astype(np.float32)
    return (weights[:, subjects].astype(np.float32) @ np.asarray(by_subject)).astype(np.float64)


def metric_values(resampled: Resampled) -> tuple[np.ndarray, np.ndarray]:
    """Every METRIC of every model, overall (M, K, 1 + R) and per group (M, G, K, 1 + R);
    resample 0 is the point estimate. Equals metrics.metric_matrix on the image weights."""
    data = resampled.data
    scopes = [np.arange(data.label.size)] + [positions for _, _, positions in resampled.groups]
    confusion = np.stack([_confusion(resampled.weights, data, positions) for positions in scopes], axis=1)  # (M, S, 4, R)
    auroc = _auroc(resampled)                                                                              # (M, S, R)
    values = metrics_from_confusion(*np.moveaxis(confusion, 2, 0), auroc)                                  # (M, S, R, K)
    values = np.moveaxis(values, 3, 2)
    return values[:, 0], values[:, 1:]


def _confusion(weights: np.ndarray, data: TaskData, positions: np.ndarray) -> np.ndarray:
    """(M, 4, 1 + R) weighted TP, FN, FP, TN of every model over the images at `positions`."""
    label, pred = data.label[positions], data.pred[:, positions]
    indicators = np.column_stack([label, ~label, (label & pred).T, (~label & pred).T])
    sums = scope_sums(weights, data.subject_index, positions, indicators)
    n_models = pred.shape[0]
    positives, negatives = sums[:, 0], sums[:, 1]
    tp, fp = sums[:, 2:2 + n_models].T, sums[:, 2 + n_models:].T
    return np.stack([tp, positives - tp, fp, negatives - fp], axis=1)


@dataclass(frozen=True)
class _Ordering:
    """For one model and one attribute: negatives sorted by (group, score) and, per positive
    (sorted by group), where its group's negatives scoring below / not above it end."""

    negative_subjects: np.ndarray
    positive_subjects: np.ndarray
    below: np.ndarray
    not_above: np.ndarray
    negative_start: np.ndarray   # (G,) first negative of each group in the sorted order
    negative_end: np.ndarray     # (G,)
    positive_start: np.ndarray   # (G,) first positive of each group
    has_positives: np.ndarray    # (G,) bool


def _ordering(data: TaskData, score_rank: np.ndarray, code: np.ndarray, n_groups: int) -> _Ordering:
    key = code.astype(np.int64) * (int(score_rank.max()) + 2) + score_rank
    negatives, positives = np.flatnonzero(~data.label), np.flatnonzero(data.label)
    negatives = negatives[np.argsort(key[negatives], kind="stable")]
    positives = positives[np.argsort(code[positives], kind="stable")]
    negative_keys = key[negatives]
    group_keys = np.arange(n_groups + 1, dtype=np.int64) * (int(score_rank.max()) + 2)
    bounds = np.searchsorted(negative_keys, group_keys, side="left")
    n_positive = np.bincount(code[positives], minlength=n_groups)
    return _Ordering(
        negative_subjects=data.subject_index[negatives], positive_subjects=data.subject_index[positives],
        below=np.searchsorted(negative_keys, key[positives], side="left"),
        not_above=np.searchsorted(negative_keys, key[positives], side="right"),
        negative_start=bounds[:-1], negative_end=bounds[1:],
        positive_start=np.r_[0, np.cumsum(n_positive)[:-1]], has_positives=n_positive > 0,
    )


def _auroc(resampled: Resampled) -> np.ndarray:
    """(M, 1 + G, 1 + R) AUROC overall (scope 0) and per group."""
    data = resampled.data
    attributes = list(dict.fromkeys(attribute for attribute, _, _ in resampled.groups))
    codes, first_scope = [np.zeros(data.label.size, dtype=np.int64)], [0]  # scope 0: everybody, one group
    scope = 1
    for attribute in attributes:
        code = np.zeros(data.label.size, dtype=np.int64)
        members = [positions for a, _, positions in resampled.groups if a == attribute]
        for g, positions in enumerate(members):
            code[positions] = g
        codes.append(code)
        first_scope.append(scope)
        scope += len(members)
    n_groups = [int(code.max()) + 1 for code in codes]
    blocks = [resampled.weights[start:start + RESAMPLE_BLOCK] for start in range(0, resampled.weights.shape[0], RESAMPLE_BLOCK)]

    def one_model(m: int) -> np.ndarray:
        score_rank = np.unique(data.prob[m], return_inverse=True)[1].astype(np.int64)
        out = np.full((scope, resampled.weights.shape[0]), np.nan)
        for code, first, count in zip(codes, first_scope, n_groups):
            order = _ordering(data, score_rank, code, count)
            out[first:first + count] = np.concatenate([_auroc_block(order, block) for block in blocks], axis=1)
        return out

    with ThreadPoolExecutor(max_workers=workers()) as pool:
        return np.stack(list(pool.map(one_model, range(len(data.archs)))))


def _auroc_block(order: _Ordering, block: np.ndarray) -> np.ndarray:
    """(G, b) AUROC for a (b, n_subjects) block of subject weights (exact integer arithmetic).

    Resamples are rows, images columns: every pass (gather, cumulative sum, per-group sums)
    runs along contiguous memory. int32 holds any cumulative weight (at most the number of
    images drawn); the per-group sums of weight x credit are taken in int64."""
    cumulative = np.zeros((block.shape[0], order.negative_subjects.size + 1), dtype=np.int32)
    np.cumsum(np.take(block, order.negative_subjects, axis=1), axis=1, out=cumulative[:, 1:])
    positive_weights = np.take(block, order.positive_subjects, axis=1)
    # Twice the credit (below + not above = 2 below + ties) keeps half-counted ties integer.
    credit = np.take(cumulative, order.below, axis=1)
    credit += np.take(cumulative, order.not_above, axis=1)
    credit *= positive_weights
    n_groups = order.negative_start.size
    twice, positive_total = np.zeros((n_groups, block.shape[0]), np.int64), np.zeros((n_groups, block.shape[0]), np.int64)
    if order.has_positives.any():
        starts = order.positive_start[order.has_positives]
        twice[order.has_positives] = np.add.reduceat(credit, starts, axis=1, dtype=np.int64).T
        positive_total[order.has_positives] = np.add.reduceat(positive_weights, starts, axis=1, dtype=np.int64).T
    base = np.take(cumulative, order.negative_start, axis=1).T.astype(np.int64)   # negatives of earlier groups
    concordant = (twice - 2 * base * positive_total) / 2
    denominator = positive_total * (np.take(cumulative, order.negative_end, axis=1).T - base)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, concordant / np.where(denominator > 0, denominator, 1), np.nan)
