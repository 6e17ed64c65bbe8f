"""Where the study stands: one row per recipe, read from files alone (`sweep --status`).

Each saved run is judged against its own saved settings (its `epochs`), unless `--as-requested`
asks about the settings given on the command line. Sources: `weights/<recipe>/status.json`
(epochs, finished, best epoch), `runs/<recipe>/metrics.jsonl`
(per-epoch validation metrics, throughput, epoch time), the recipe's lock (held = running) and its
log (the last error line of a failed run). Nothing here imports torch, so 114 rows print at once.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from cxr_fast.locks import describe, lock_holder
from cxr_fast.recipes import Config
from cxr_fast.same_run import is_finished
from cxr_fast.schema import RESUME_FILE, finished_status, read_status

# A line that says why a run ended: `error: ...` (CxrError), `SomethingError: ...` (a traceback's
# last line), an out-of-memory kill, a Slurm cancellation or time-out.
_ERROR_LINE = re.compile(r"^error: |Error: |Exception: |\bKilled\b|CANCELLED|DUE TO TIME LIMIT|out of memory", re.I)
_JOB_HEADER = "== "  # each job's first line in the recipe's log (sweep writes it, Slurm or not)
_LOG_TAIL_BYTES = 64 * 1024


def recipe_status(config: Config, *, logs: Path, as_requested: bool = False) -> dict:
    """One recipe's row. A saved run is judged against its own saved settings (a run trained with
    `epochs=2` is finished after 2 epochs); with `as_requested`, against `config` (what a sweep
    with these settings would still do: more epochs reopen a finished run)."""
    status = read_status(config.weights_path) or {}
    own = not as_requested and bool(status)
    target = status.get("epochs") if own and isinstance(status.get("epochs"), int) else config.epochs
    metrics = _read_metrics(config.run_path / "metrics.jsonl")
    epochs_done = status.get("epoch") or max((line["epoch"] for line in metrics), default=0)
    best_epoch = status.get("best_epoch") or _best_epoch(metrics)
    best = next((line for line in metrics if line["epoch"] == best_epoch), {})
    holder = lock_holder(config.weights_path)
    log = logs / f"{config.recipe}.log"
    error = None
    if holder is not None:
        state = "running"
    elif (finished_status(config.weights_path, recipe=config.recipe, epochs=target) if own else is_finished(config)):
        state = "stopped early" if status.get("stopped_early") else "finished"
    elif not (epochs_done or log.is_file() or (config.weights_path / RESUME_FILE).is_file()):
        state = "not started"
    else:
        error = last_error_line(log)
        state = "failed" if error else "interrupted"
    done = state in ("finished", "stopped early")
    return {
        "recipe": config.recipe, "state": state, "epochs_done": epochs_done, "epochs": target,
        "best_epoch": best_epoch if best_epoch and best_epoch > 0 else None,
        "best_val_balanced_accuracy": best.get("val_balanced_accuracy"), "best_val_auroc": best.get("val_auroc"),
        "images_per_second": metrics[-1].get("images_per_second") if metrics else None,
        "seconds_left": 0.0 if done else _seconds_left(metrics, target - epochs_done),
        "held_by": describe(holder) if holder is not None else None, "last_error": error,
    }


def last_error_line(log: Path) -> str | None:
    """The last line of the latest job in the log that says why it ended, if any."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - _LOG_TAIL_BYTES))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    starts = [index for index, line in enumerate(lines) if line.startswith(_JOB_HEADER)]
    latest = lines[starts[-1]:] if starts else lines
    errors = [line.strip() for line in latest if _ERROR_LINE.search(line)]
    return errors[-1] if errors else None


def totals(rows: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    known = [row["seconds_left"] for row in rows if row["seconds_left"] is not None]
    return {"recipes": len(rows), "states": counts,
            "epochs_done": sum(min(row["epochs_done"], row["epochs"]) for row in rows),
            "epochs": sum(row["epochs"] for row in rows),
            "seconds_left": sum(known), "recipes_without_estimate": len(rows) - len(known)}


def format_table(rows: list[dict]) -> str:
    header = ("recipe", "state", "epochs", "best", "val bal.acc", "val AUROC", "img/s", "time left")
    body = [(row["recipe"], row["state"], f"{row['epochs_done']}/{row['epochs']}", _text(row["best_epoch"]),
             _number(row["best_val_balanced_accuracy"], "{:.3f}"), _number(row["best_val_auroc"], "{:.3f}"),
             _number(row["images_per_second"], "{:.0f}"), _duration(row["seconds_left"])) for row in rows]
    widths = [max(len(line[column]) for line in [header, *body]) for column in range(len(header))]
    out = []
    for line, row in zip([header, *body], [None, *rows]):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if row and row["state"] == "running":
            out.append(f"    held by {row['held_by']}")
        if row and row["last_error"]:
            out.append(f"    last error: {row['last_error']}")
    total = totals(rows)
    states = ", ".join(f"{count} {state}" for state, count in sorted(total["states"].items()))
    left = _duration(total["seconds_left"])
    if total["recipes_without_estimate"] == total["recipes"]:
        left = "unknown (no epoch measured yet)"
    elif total["recipes_without_estimate"]:
        left = f"at least {left} (+ {total['recipes_without_estimate']} recipes without a measured epoch)"
    out.append(f"total: {total['recipes']} recipes ({states}); epochs {total['epochs_done']}/{total['epochs']}; "
               f"time left {left}, one recipe after another")
    return "\n".join(out)


def print_status(configs: list[Config], *, logs: Path, as_json: bool, as_requested: bool = False) -> None:
    rows = [recipe_status(config, logs=logs, as_requested=as_requested) for config in configs]
    if as_json:
        json.dump({"recipes": rows, "total": totals(rows)}, sys.stdout, indent=1)
        print()
    else:
        print(format_table(rows))


# ------------------------------------------------------------------ helpers


def _read_metrics(path: Path) -> list[dict]:
    """The per-epoch records; a line cut short by a kill is left out."""
    try:
        text = path.read_text()
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def _best_epoch(metrics: list[dict]) -> int | None:
    scored = [line for line in metrics if line.get("val_balanced_accuracy") is not None]
    return max(scored, key=lambda line: line["val_balanced_accuracy"])["epoch"] if scored else None


def _seconds_left(metrics: list[dict], epochs_left: int) -> float | None:
    """Epochs left times the mean time of the last (up to) three epochs; None before any."""
    recent = [line["epoch_seconds"] for line in metrics[-3:] if isinstance(line.get("epoch_seconds"), (int, float))]
    return max(0, epochs_left) * sum(recent) / len(recent) if recent else None


def _text(value) -> str:
    return "-" if value is None else str(value)


def _number(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"
