#!/usr/bin/env python3
"""Build a cohort and write it as WebDataset shards: see cxr_fast/data/shard_dataset.py (--help)."""

from cxr_fast.data.shard_dataset import main
from cxr_fast.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
