"""Report figures as base64 PNG data URIs, drawn with matplotlib's Agg renderer.

PNG rather than inline SVG: matplotlib's SVG carries XML namespace and metadata URLs, and the
report must contain no external reference of any kind. Figures are built with the object API
(matplotlib.figure.Figure, rendered by Agg) rather than pyplot, so importing this module never
switches the backend of a notebook and nothing needs a display.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from cxr_fast.analyze.calibration import bin_points
from cxr_fast.analyze.groups import group_sort_key
from cxr_fast.analyze.inputs import TaskData
from cxr_fast.analyze.parallel import process_pool, processes_pay, workers
from cxr_fast.metrics import roc_points
from cxr_fast.schema import DEMOGRAPHICS

DPI = 90
MAX_MARKERS = 6  # forest plots show one marker per model up to this many models per task
FLAG_COLOR = "#c0392b"


Jobs = dict[Hashable, tuple[Callable[..., str], dict[str, Any]]]  # name -> (figure function, its keyword arguments)


def draw_all(jobs: Jobs, *, rows: int) -> dict[Hashable, str]:
    """Every figure of `jobs` as a data URI (see `drawing`)."""
    with drawing(jobs, rows=rows) as drawn:
        return drawn()


@contextlib.contextmanager
def drawing(jobs: Jobs, *, rows: int) -> Iterator[Callable[[], dict[Hashable, str]]]:
    """Start drawing every figure of `jobs`; the yielded function returns name -> data URI.

    Drawing is Python-bound (text layout, Agg), so for a study-sized input (`rows`
    predictions) with cores to spare the figures are drawn in worker processes, the slowest
    first, while the caller goes on (writing the tables, say). The figures are the same
    either way; in-process they are drawn when asked for."""
    n_workers = min(workers(), len(jobs))
    if n_workers <= 1 or not processes_pay(rows):
        yield lambda: {name: function(**kwargs) for name, (function, kwargs) in jobs.items()}
        return
    with process_pool(n_workers, preload=(__name__,)) as pool:
        futures = {name: pool.submit(function, **kwargs) for name, (function, kwargs) in jobs.items()}
        yield lambda: {name: future.result() for name, future in futures.items()}


def _data_uri(figure: Figure) -> str:
    # bbox_inches="tight" trims the margins; a tight_layout() pass as well would double the
    # (text-layout bound) rendering time for little gain.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_bytes(uri: str) -> bytes:
    """The PNG file of a data URI made by _data_uri."""
    return base64.b64decode(uri.split(",", 1)[1])


def _grid(n_panels: int, *, width: float = 4.0, height: float = 3.6, columns: int = 3):
    columns = max(1, min(columns, n_panels))
    rows = int(np.ceil(n_panels / columns))
    figure = Figure(figsize=(width * columns, height * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    figure.subplots_adjust(wspace=0.35, hspace=0.45)
    for axis in axes.ravel()[n_panels:]:
        axis.set_visible(False)
    return figure, axes.ravel()


def roc_figure(tasks: list[TaskData]) -> str:
    """One panel per task, one ROC curve per model. Up to MAX_MARKERS models each curve is
    named with its AUROC; beyond that the curves are drawn alike and the legend gives the
    AUROC range (the models table names them)."""
    figure, axes = _grid(len(tasks))
    for axis, data in zip(axes, tasks):
        if data.label.all() or not data.label.any():
            continue  # one class: no ROC curve exists
        many = len(data.archs) > MAX_MARKERS
        aucs = []
        for m, arch in enumerate(data.archs):
            points = roc_points(label=data.label, score=data.prob[m])
            fpr, tpr = points["fpr"].to_numpy(), points["tpr"].to_numpy()
            # The exact vertices' trapezoids are the AUROC, ties counted half.
            aucs.append(float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2))
            fpr, tpr = _drawn_roc(fpr, tpr)
            style = dict(lw=0.8, color="#2c7fb8", alpha=0.5) if many else dict(lw=1.2, label=f"{arch} ({aucs[-1]:.3f})")
            axis.plot(fpr, tpr, **style)
        if many:
            axis.plot([], [], lw=0.8, color="#2c7fb8", label=f"{len(aucs)} models ({min(aucs):.3f} to {max(aucs):.3f})")
        axis.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        axis.set(title=data.task, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
        axis.legend(fontsize=7, loc="lower right", title="model (AUROC)", title_fontsize=7)
    return _data_uri(figure)


ROC_DRAWN_POINTS = 1024  # per curve; a panel is ~360 px wide


def _drawn_roc(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The curve as drawn: its vertices if there are at most ROC_DRAWN_POINTS, otherwise a
    staircase through the highest TPR reached at each of ROC_DRAWN_POINTS evenly spaced FPRs.
    A study-sized test split has ~30,000 vertices per curve, 114 curves take seconds to
    rasterise, and at this resolution the difference is under a pixel."""
    if fpr.size <= ROC_DRAWN_POINTS:
        return fpr, tpr
    grid = np.linspace(0, 1, ROC_DRAWN_POINTS)
    reached = np.maximum.accumulate(tpr)[np.searchsorted(fpr, grid, side="right") - 1]
    return np.repeat(grid, 2)[1:], np.repeat(reached, 2)[:-1]  # steps: right, then up


def forest_figure(subgroups: pd.DataFrame, *, task: str, metrics: tuple[str, ...] = ("fnr", "fpr")) -> str:
    """Gap to overall with 95% CI, per single-attribute group (rows) and model (markers).
    Flagged gaps are red; hollow markers are groups too small to be tested."""
    rows = subgroups[(subgroups["task"] == task) & subgroups["attribute"].isin(DEMOGRAPHICS)]
    groups = sorted({(a, g) for a, g in zip(rows["attribute"], rows["group"])}, key=lambda ag: group_sort_key(*ag))
    archs = list(dict.fromkeys(rows["arch"]))
    if len(archs) > MAX_MARKERS:
        return _forest_summary_figure(rows, groups, task=task, metrics=metrics, n_models=len(archs))
    figure = Figure(figsize=(5.2 * len(metrics), 0.32 * len(groups) + 1.4))
    axes = figure.subplots(1, len(metrics), squeeze=False, sharey=True)
    offsets = np.linspace(-0.3, 0.3, len(archs)) if len(archs) > 1 else np.zeros(1)
    markers = "osD^v<>ph*"
    for axis, metric in zip(axes[0], metrics):
        for offset, arch, marker in zip(offsets, archs, markers * 10):
            part = rows[(rows["arch"] == arch) & (rows["metric"] == metric)].set_index(["attribute", "group"]).reindex(groups)
            y = np.arange(len(groups)) + offset
            error = np.abs(np.vstack([part["gap_overall"] - part["gap_overall_ci_low"], part["gap_overall_ci_high"] - part["gap_overall"]]))
            colors = np.where(part["flagged"].fillna(False).astype(bool), FLAG_COLOR, "#34495e")
            axis.errorbar(part["gap_overall"], y, xerr=np.nan_to_num(error), fmt="none", ecolor=colors, elinewidth=0.8)
            filled = part["eligible"].fillna(False).astype(bool).to_numpy()
            axis.scatter(part["gap_overall"][filled], y[filled], c=colors[filled], marker=marker, s=18, label=arch)
            axis.scatter(part["gap_overall"][~filled], y[~filled], facecolors="none", edgecolors=colors[~filled], marker=marker, s=18)
        axis.axvline(0, color="grey", lw=0.8)
        axis.set(title=f"{task}: {metric.upper()} gap to overall", xlabel=f"{metric.upper()} group - overall")
        axis.set_yticks(np.arange(len(groups)), [f"{a}: {g}" for a, g in groups], fontsize=8)
        axis.grid(axis="x", lw=0.3)
    axes[0][0].invert_yaxis()  # once: the panels share the y axis, a second call undoes it
    axes[0][-1].legend(fontsize=7, loc="best")
    return _data_uri(figure)


def _forest_summary_figure(rows: pd.DataFrame, groups: list, *, task: str, metrics: tuple[str, ...], n_models: int) -> str:
    """Many models: per group the median gap over models (marker) and their range (bar); red
    with the count when any model is flagged. One marker per model would be unreadable."""
    figure = Figure(figsize=(5.2 * len(metrics), 0.32 * len(groups) + 1.4))
    axes = figure.subplots(1, len(metrics), squeeze=False, sharey=True)
    for axis, metric in zip(axes[0], metrics):
        part = rows[rows["metric"] == metric].groupby(["attribute", "group"])
        stats = pd.DataFrame({"median": part["gap_overall"].median(), "low": part["gap_overall"].min(),
                              "high": part["gap_overall"].max(), "flagged": part["flagged"].sum(),
                              "eligible": part["eligible"].any()}).reindex(groups)
        y = np.arange(len(groups))
        flagged = stats["flagged"].fillna(0).to_numpy() > 0
        colors = np.where(flagged, FLAG_COLOR, "#34495e")
        axis.hlines(y, stats["low"], stats["high"], colors=colors, lw=2.5, alpha=0.5)
        filled = stats["eligible"].fillna(False).astype(bool).to_numpy()
        axis.scatter(stats["median"][filled], y[filled], c=colors[filled], s=22, zorder=3)
        axis.scatter(stats["median"][~filled], y[~filled], facecolors="none", edgecolors=colors[~filled], s=22, zorder=3)
        for yy, high, count in zip(y[flagged], stats["high"][flagged], stats["flagged"][flagged]):
            axis.text(high, yy, f"  {int(count)}/{n_models}", va="center", fontsize=7, color=FLAG_COLOR)
        axis.axvline(0, color="grey", lw=0.8)
        axis.set(title=f"{task}: {metric.upper()} gap to overall ({n_models} models)",
                 xlabel=f"{metric.upper()} group - overall: median (dot), range over models (bar)")
        axis.set_yticks(y, [f"{a}: {g}" for a, g in groups], fontsize=8)
        axis.grid(axis="x", lw=0.3)
    axes[0][0].invert_yaxis()
    return _data_uri(figure)


def kappa_figure(consistency: pd.DataFrame) -> str:
    """Pairwise error-consistency matrix (kappa on all test images), one panel per task."""
    overall = consistency[(consistency["attribute"] == "overall") & (consistency["kind"] == "pair")]
    tasks = list(dict.fromkeys(overall["task"]))
    figure, axes = _grid(len(tasks), width=4.2, height=3.8)
    figure.subplots_adjust(wspace=0.6)
    image = None
    for axis, task in zip(axes, tasks):
        pairs = overall[overall["task"] == task]
        archs = list(dict.fromkeys(list(pairs["model_a"]) + list(pairs["model_b"])))
        matrix = np.eye(len(archs))
        for a, b, kappa in zip(pairs["model_a"], pairs["model_b"], pairs["kappa"]):
            i, j = archs.index(a), archs.index(b)
            matrix[i, j] = matrix[j, i] = kappa
        image = axis.imshow(matrix, vmin=-0.2, vmax=1, cmap="viridis")
        for i in range(len(archs)):
            for j in range(len(archs)):
                if len(archs) <= 8:
                    axis.text(j, i, "NaN" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if matrix[i, j] < 0.6 else "black")
        axis.set_xticks(range(len(archs)), archs, rotation=45, ha="right", fontsize=7)
        axis.set_yticks(range(len(archs)), archs, fontsize=7)
        axis.set_title(f"{task} (kappa)")
    if image is not None:
        figure.colorbar(image, ax=list(axes), fraction=0.02, pad=0.02, label="kappa")
    return _data_uri(figure)


def mean_kappa_figure(consistency: pd.DataFrame) -> str:
    """Mean pairwise kappa per single-attribute group (rows) and task (columns)."""
    means = consistency[(consistency["kind"] == "mean") & consistency["attribute"].isin(("overall",) + DEMOGRAPHICS)]
    table = means.set_index(["attribute", "group", "task"])["kappa"].unstack("task")
    order = sorted(table.index, key=lambda ag: (-1,) if ag[0] == "overall" else group_sort_key(*ag))
    table = table.reindex(order)
    figure = Figure(figsize=(1.1 * table.shape[1] + 2.5, 0.3 * table.shape[0] + 1.2))
    axis = figure.subplots()
    image = axis.imshow(table.to_numpy(float), vmin=-0.2, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(table.to_numpy(float)):
        axis.text(j, i, "NaN" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7,
                  color="white" if not value >= 0.6 else "black")
    axis.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right", fontsize=8)
    axis.set_yticks(range(table.shape[0]), [f"{a}: {g}" for a, g in table.index], fontsize=8)
    axis.set_title("mean error consistency (kappa) over model pairs")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    return _data_uri(figure)


def composition_figure(systematic: pd.DataFrame, *, attribute: str) -> str:
    """Per task, four stacked bars of group shares: all positives vs systematic false
    negatives, all negatives vs systematic false positives. Unequal neighbours = skew."""
    rows = systematic[systematic["attribute"] == attribute]
    tasks = list(dict.fromkeys(rows["task"]))
    groups = sorted(set(rows["group"]), key=lambda g: group_sort_key(attribute, g))
    colors = matplotlib.colormaps["tab10"](np.arange(len(groups)) % 10)
    figure = Figure(figsize=(1.9 * len(tasks) + 2.5, 3.8))
    axis = figure.subplots()
    bars = [("false_negative", "share_of_class", "pos"), ("false_negative", "share_of_systematic", "sys FN"),
            ("false_positive", "share_of_class", "neg"), ("false_positive", "share_of_systematic", "sys FP")]
    positions, labels, shares = [], [], []  # shares: one (groups,) column per bar
    for t, task in enumerate(tasks):
        for b, (error, column, label) in enumerate(bars):
            positions.append(t * (len(bars) + 1.2) + b)
            count = rows[(rows["task"] == task) & (rows["error"] == error)]
            shares.append(count.set_index("group")[column].reindex(groups).fillna(0).to_numpy(float))
            total = count["n_class" if column == "share_of_class" else "n_systematic"].iloc[0] if len(count) else 0
            labels.append(f"{label} ({total})")
        axis.text(t * (len(bars) + 1.2) + 1.5, 1.04, task, ha="center", fontsize=8)
    heights = np.column_stack(shares) if shares else np.zeros((len(groups), 0))
    bottoms = np.cumsum(heights, axis=0) - heights
    for group, color, height, bottom in zip(groups, colors, heights, bottoms):  # one call per group: all bars
        axis.bar(positions, height, bottom=bottom, color=color, width=0.85, label=group)
    axis.set_xticks(positions, labels, rotation=90, fontsize=7)
    axis.set(ylim=(0, 1.1), ylabel="share of images", title=f"who is systematically misclassified, by {attribute}")
    axis.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return _data_uri(figure)


MAX_RELIABILITY_PANELS = 6  # overall and up to 5 flagged groups per task (every group is in calibration.csv)


def reliability_figure(data: TaskData, groups: list[tuple[str, str, np.ndarray]]) -> str:
    """Reliability diagram of one task: observed rate against mean predicted probability per
    ECE bin, one line per model; a panel for all test images, then one per flagged group
    (attribute, group, image positions). Up to MAX_MARKERS models each line is named and its
    points sized by the bin's images; beyond that the lines are drawn alike, as one artist."""
    scopes = [("all test images", np.arange(data.label.size))] + [(f"{a}: {g}", p) for a, g, p in groups]
    scopes = scopes[:MAX_RELIABILITY_PANELS]
    figure, axes = _grid(len(scopes), width=3.6, height=3.4)
    many = len(data.archs) > MAX_MARKERS
    for axis, (title, positions) in zip(axes, scopes):
        curves = [bin_points(data.label[positions], data.prob[m, positions]) for m in range(len(data.archs))]
        if many:
            axis.add_collection(LineCollection([np.column_stack([predicted, observed]) for _, _, predicted, observed in curves],
                                               colors="#2c7fb8", alpha=0.4, linewidths=0.8))
            axis.text(0.98, 0.02, f"{len(data.archs)} models", ha="right", fontsize=7, transform=axis.transAxes)
        else:
            for arch, (_, count, predicted, observed) in zip(data.archs, curves):
                line, = axis.plot(predicted, observed, lw=1.2, label=arch)
                axis.scatter(predicted, observed, s=4 + 60 * count / max(positions.size, 1), color=line.get_color())
            axis.legend(fontsize=6, loc="upper left")
        axis.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed rate")
        axis.set_title(f"{data.task}: {title}", fontsize=9, color="black" if title == scopes[0][0] else FLAG_COLOR)
    return _data_uri(figure)
