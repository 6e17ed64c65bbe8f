"""The learning-rate schedule: linear warmup, then cosine to the floor, a pure function of the step."""

from __future__ import annotations

import pytest

from cxr_fast.train import lr_at


def test_lr_warms_up_then_decays_by_cosine_to_the_floor():
    lrs = [lr_at(step, total_steps=100, warmup_steps=10, base_lr=1.0, min_lr_ratio=0.01) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, total_steps=100, warmup_steps=10, base_lr=1.0, min_lr_ratio=0.01) == pytest.approx(0.01)
    assert lrs[55] == pytest.approx(0.01 + 0.99 * 0.5)
