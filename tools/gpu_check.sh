#!/usr/bin/env bash
# tools/gpu_check.sh OUT_DIR [--tiny]: `python -m cxr_fast.bench gpu-check` from this checkout, with any python3.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m cxr_fast.bench gpu-check "$@"
