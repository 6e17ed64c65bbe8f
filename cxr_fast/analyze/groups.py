"""Which subgroups every table looks at, and in which order they are shown."""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import pandas as pd

from cxr_fast.schema import AGE_GROUPS, RACE_GROUPS, SEX_GROUPS, UNKNOWN, VIEW

# Single attributes, then the two intersections the study reports (sex x race, sex x age).
GROUPINGS: tuple[tuple[str, ...], ...] = (
    ("sex",), ("age_group",), ("race",), (VIEW,), ("sex", "race"), ("sex", "age_group"),
)

LEVEL_ORDER: dict[str, tuple[str, ...]] = {
    "sex": (*SEX_GROUPS, UNKNOWN),
    "age_group": (*AGE_GROUPS, UNKNOWN),
    "race": (*RACE_GROUPS, UNKNOWN),
    VIEW: ("PA", "AP", UNKNOWN),
}


def attribute_name(columns: tuple[str, ...]) -> str:
    return " x ".join(columns)


def group_name(values: tuple[str, ...]) -> str:
    return " & ".join(values)


def ordered_levels(column: str, values: np.ndarray) -> list[str]:
    present = set(np.unique(values).tolist())
    known = [level for level in LEVEL_ORDER.get(column, ()) if level in present]
    # Values outside the documented vocabulary are still analysed, after the known ones.
    return known + sorted(present - set(known))


def iter_groups(images: pd.DataFrame, *, groupings: tuple[tuple[str, ...], ...] = GROUPINGS
                ) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yield (attribute, group, image positions) for every non-empty group, in display order."""
    # Plain numpy string arrays: pandas' Arrow-backed strings are slow to iterate and compare.
    values = {column: images[column].to_numpy(dtype=str) for column in {c for g in groupings for c in g}}
    for columns in groupings:
        levels = [ordered_levels(column, values[column]) for column in columns]
        for combination in itertools.product(*levels):
            member = np.logical_and.reduce([values[c] == level for c, level in zip(columns, combination)])
            if member.any():
                yield attribute_name(columns), group_name(combination), np.flatnonzero(member)


def group_sort_key(attribute: str, group: str) -> tuple:
    """Display order for an (attribute, group) pair coming back from a table: groupings in
    GROUPINGS order, levels in LEVEL_ORDER, anything unknown last."""
    names = [attribute_name(columns) for columns in GROUPINGS]
    grouping_rank = names.index(attribute) if attribute in names else len(names)
    ranks = []
    for column, value in zip(attribute.split(" x "), group.split(" & ")):
        order = LEVEL_ORDER.get(column, ())
        ranks.append(order.index(value) if value in order else len(order))
    return (grouping_rank, tuple(ranks), group)
