"""Prediction files for the analysis tests: the simulator lives in the library
(cxr_fast.analyze.simulate, reusable for demos); this adds the test-side helpers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxr_fast.analyze.simulate import PlantedMiss, simulate_predictions, write_prediction_files

__all__ = ["PlantedMiss", "simulate_predictions", "write_pred_dir", "write_frames"]


def write_pred_dir(root: Path, **simulate_args) -> Path:
    """Simulate predictions and write them as `root/all_pred/<recipe>.parquet`."""
    pred_dir = root / "all_pred"
    write_prediction_files(predictions=simulate_predictions(**simulate_args), pred_dir=pred_dir)
    return pred_dir


def write_frames(pred_dir: Path, frames: dict[str, pd.DataFrame]) -> Path:
    """Write hand-edited frames as `<name>.parquet` (for the broken-input tests)."""
    pred_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame.to_parquet(pred_dir / f"{name}.parquet", index=False)
    return pred_dir
