# cxr_fast — every command a user needs. `make demo` and `make test` set everything up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Keep compiler caches and temporary files inside the project, not in /tmp.
export TMPDIR := $(CURDIR)/build/tmp
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/build/inductor
export MPLCONFIGDIR := $(CURDIR)/build/matplotlib

PHANTOM_DIR ?= data/phantom
PHANTOM_IMAGES ?= 8000
PHANTOM_SEED ?= 0
SHARD_SIZE ?= 1000
ifdef MIMIC_CXR
SHARDS ?= shards/mimic
else
SHARDS ?= shards/phantom
endif
# The recipes that load more than 256 px (e.g. convnext_base_384: 439 px) read a second set at
# 448 px; runs pick the smallest listed set stored at >= their load size (shards=A,B).
LARGE_SHARD_PX ?= 448
LARGE_SHARDS ?= $(SHARDS)-$(LARGE_SHARD_PX)
# The demo: three CPU-sized archs x six tasks, a few epochs each at 64 px. It keeps its weights,
# logs and predictions in $(DEMO_DIR)/, apart from a user's own weights/, runs/ and all_pred/.
DEMO_ARCHS ?= test_resnet,test_convnext,test_efficientnet
DEMO_EPOCHS ?= 6
DEMO_SETTINGS ?=
DEMO_ANALYZE ?=
DEMO_DIR ?= demo
DEMO_REPORT ?= reports/demo

.PHONY: setup test test-fast test-slurm shards demo demo-steps bench clean help
help:
	@echo "make setup   create .venv and install everything (torch pinned, see constraints.txt)"
	@echo "make shards  build the phantom data set and shard it to $(SHARDS)/ (or real MIMIC: MIMIC_CXR=... MIMIC_IV=... make shards)"
	@echo "make demo    the whole chain on the built-in phantom data: shards, train, predict, explain, analyze"
	@echo "make test    the test suite (CPU, a few minutes)"
	@echo "make test-fast  the tests not marked slow (no subprocess training, kills, sweeps or compiles)"
	@echo "make test-slurm  the Slurm array on a one-node Slurm cluster started here (root; installs slurm-wlm, munge)"
	@echo "make bench   the CPU benchmark suite; writes benchmarks/results/ and BENCHMARKS.md"

setup: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: otherwise pip may resolve a multi-GB build of another version.
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	mkdir -p $(TMPDIR) $(TORCHINDUCTOR_CACHE_DIR) $(MPLCONFIGDIR)
	touch $(STAMP)

dirs:
	@mkdir -p $(TMPDIR) $(TORCHINDUCTOR_CACHE_DIR) $(MPLCONFIGDIR)

test: setup dirs
	WANDB_MODE=disabled $(PY) -m pytest -q

# What to run while working: everything except the tests marked `slow` (pyproject.toml).
test-fast: setup dirs
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

# A real Slurm: 3 CPU recipes as an array, one cancelled and resubmitted, weights checked against a
# direct run (~3 min; skips with the reason where it cannot run: not root, no apt-get, no network).
test-slurm: setup dirs
	WANDB_MODE=disabled $(PY) tools/slurm_test.py

# CPU suite (< 10 min on 2 cores): benchmarks/results/<machine>-<date>.json + the table in BENCHMARKS.md;
# then the analysis at study size and the intervals' coverage study (their own JSON files there).
# The phantom it draws (1,024 px sources, 256 px shards) is cached in build/bench/.
bench: setup dirs
	WANDB_MODE=disabled $(PY) -m cxr_fast.bench suite
	$(PY) -m cxr_fast.analyze.scale_bench   # the analysis at study size: time, peak memory, report size
	$(PY) -m cxr_fast.analyze.coverage_bench   # do the report's 95% intervals cover? (~10 min of CPU on 2 free cores)

ifdef MIMIC_CXR
shards: setup dirs
	$(PY) tools/shard_dataset.py --source mimic --root $(MIMIC_CXR) $(if $(MIMIC_IV),--demographics $(MIMIC_IV)) --out $(SHARDS) --size 256
	$(PY) tools/shard_dataset.py --source mimic --root $(MIMIC_CXR) $(if $(MIMIC_IV),--demographics $(MIMIC_IV)) --out $(LARGE_SHARDS) --size $(LARGE_SHARD_PX)
else
shards: setup dirs $(SHARDS)/manifest.parquet $(LARGE_SHARDS)/manifest.parquet
$(PHANTOM_DIR)/phantom_truth.json:
	$(PY) -m cxr_fast.data.phantom --out $(PHANTOM_DIR) --n-images $(PHANTOM_IMAGES) --seed $(PHANTOM_SEED)
$(SHARDS)/manifest.parquet: $(PHANTOM_DIR)/phantom_truth.json
	$(PY) tools/shard_dataset.py --source mimic --root $(PHANTOM_DIR)/mimic-cxr-jpg \
	    --demographics $(PHANTOM_DIR)/mimic-iv --out $(SHARDS) --size 256 --shard-size $(SHARD_SIZE)
$(LARGE_SHARDS)/manifest.parquet: $(PHANTOM_DIR)/phantom_truth.json
	$(PY) tools/shard_dataset.py --source mimic --root $(PHANTOM_DIR)/mimic-cxr-jpg \
	    --demographics $(PHANTOM_DIR)/mimic-iv --out $(LARGE_SHARDS) --size $(LARGE_SHARD_PX) --shard-size $(SHARD_SIZE)
endif

# The demo's archs train at 64 px: the 256 px set serves them, the 448 px one is not needed.
demo: setup dirs $(if $(MIMIC_CXR),,$(SHARDS)/manifest.parquet)
	@$(MAKE) --no-print-directory demo-steps

# The demo's own steps on shards that exist (tests run them on a tiny set): a rerun resumes or
# skips its recipes; weights, logs and predictions go to $(DEMO_DIR)/, the report to $(DEMO_REPORT)/.
demo-steps: dirs
	$(PY) -m cxr_fast.sweep --in-process --tasks all --archs $(DEMO_ARCHS) --logs $(DEMO_DIR)/runs/sweep \
	    shards=$(SHARDS) epochs=$(DEMO_EPOCHS) logger=none weights_dir=$(DEMO_DIR)/weights runs_dir=$(DEMO_DIR)/runs $(DEMO_SETTINGS)
	$(PY) -m cxr_fast.predict --all --split test --out-dir $(DEMO_DIR)/all_pred shards=$(SHARDS) weights_dir=$(DEMO_DIR)/weights
	$(PY) -m cxr_fast.explain --pred-dir $(DEMO_DIR)/all_pred weights_dir=$(DEMO_DIR)/weights   # the gallery's heatmaps -> $(DEMO_DIR)/all_pred/explain/
	$(PY) -m cxr_fast.analyze --pred-dir $(DEMO_DIR)/all_pred --out $(DEMO_REPORT) $(DEMO_ANALYZE)
	@echo "report: $(CURDIR)/$(DEMO_REPORT)/index.html"

clean:
	rm -rf build shards data/phantom weights runs all_pred reports review wandb $(DEMO_DIR)
