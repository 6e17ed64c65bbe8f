"""A training run's per-epoch log: `runs/<recipe>/metrics.jsonl`, and W&B unless logger=none."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from cxr_fast.errors import reported_os_errors
from cxr_fast.io import atomic_path
from cxr_fast.recipes import Config


class MetricsLog:
    """`runs/<recipe>/metrics.jsonl` always; W&B too unless logger=none (offline without a login)."""

    def __init__(self, config: Config, *, enabled: bool, resume_epoch: int):
        self.path = config.run_path / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        self._truncate_after(resume_epoch)
        if config.logger == "wandb":
            self.wandb = _start_wandb(config)

    def _truncate_after(self, epoch: int) -> None:
        # A run killed mid-epoch may have logged epochs that the resume will redo.
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _epoch_of(line) <= epoch]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with reported_os_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _epoch_of(line: str) -> float:
    """The epoch of a metrics.jsonl line; a line cut short by a kill sorts after every epoch."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _start_wandb(config: Config):
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: logging to metrics.jsonl only", file=sys.stderr)
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
    if mode == "disabled":
        return None
    config.run_path.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=config.wandb_project, name=config.recipe, id=config.recipe.replace("/", "-"),
                      resume="allow", dir=str(config.run_path), config=config.to_dict(), mode=mode)


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
