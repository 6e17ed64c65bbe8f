"""Benchmarks (see data.py for the commands while it is split into one module per job)."""

from cxr_fast.bench.data import *  # noqa: F401,F403
