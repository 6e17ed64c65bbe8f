"""The engine's GPU-path decisions, checked on a CPU: compilation per model, the resident
memory budget, the sharded evaluation order, the checkpoint cadence, lr scaling, fused AdamW."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cxr_fast.train as training
from cxr_fast import engine
from cxr_fast.loading import TRAINING_STATE_COPIES, resident_budget
from cxr_fast.recipes import load_config

RECIPE = "effusion_test_resnet"
GB = 1 << 30


def tiny(shards: Path, out: Path, **overrides) -> list[str]:
    settings = {"shards": shards, "weights_dir": out / "weights", "runs_dir": out / "runs", "batch_size": 16,
                "image_size": 64, "epochs": 1, "max_steps_per_epoch": 2, "logger": "none", "loader": "resident",
                "seed": 0, "precision": "fp32"}
    settings.update(overrides)
    return [f"{key}={value}" for key, value in settings.items()]


# ------------------------------------------------------------------ compile


@pytest.fixture
def compile_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append("compile") or model)
    return calls


def test_every_compiled_model_starts_from_a_reset_dynamo(compile_calls):
    config = load_config(RECIPE, ["compile=on"])
    for _ in range(3):  # predict --all, sweep --in-process: one model after another
        engine.compile_model(torch.nn.Linear(2, 1), config, torch.device("cpu"))
    assert compile_calls == ["reset", "compile"] * 3
    engine.compile_model(torch.nn.Linear(2, 1), load_config(RECIPE, ["compile=off"]), torch.device("cpu"))
    engine.compile_model(torch.nn.Linear(2, 1), load_config(RECIPE, ["compile=auto"]), torch.device("cpu"))
    assert len(compile_calls) == 6  # nothing compiled, nothing reset


def test_predict_does_not_compile_unless_asked(phantom_shards, tmp_path, compile_calls):
    from cxr_fast.predict import predict

    training.train(load_config(RECIPE, tiny(phantom_shards, tmp_path)), progress_bar=False)
    best = tmp_path / "weights" / RECIPE / "best.json"
    record = json.loads(best.read_text())
    record["config"]["compile"] = "on"  # trained with compilation
    best.write_text(json.dumps(record))
    place = {"weights_dir": str(tmp_path / "weights"), "shards": str(phantom_shards)}
    predict(RECIPE, place, split="val", out_dir=tmp_path / "pred")
    assert compile_calls == []
    predict(RECIPE, place | {"compile": "on"}, split="val", out_dir=tmp_path / "pred")
    assert compile_calls == ["reset", "compile"]


# ------------------------------------------------------------------ memory


def test_the_resident_budget_is_a_share_of_what_model_state_and_activations_leave():
    free, params, activations = 80 * GB, 1 * GB, 10 * GB
    assert TRAINING_STATE_COPIES == 3  # gradients + AdamW's two moments
    assert resident_budget(free_bytes=free, parameter_bytes=params, activation_bytes=activations, share=0.5) \
        == int(0.5 * (80 - 3 - 10) * GB)
    # Prediction keeps no gradients or optimiser state.
    assert resident_budget(free_bytes=free, parameter_bytes=params, activation_bytes=activations, share=0.5,
                           training=False) == int(0.5 * (80 - 10) * GB)
    # A model that already fills the device leaves nothing, never a negative budget.
    assert resident_budget(free_bytes=4 * GB, parameter_bytes=2 * GB, activation_bytes=GB, share=1.0) == 0


def test_the_cpu_budget_counts_the_model_and_an_activation_estimate(monkeypatch):
    import cxr_fast.loading as loading

    monkeypatch.setattr(loading, "device_memory_bytes", lambda device: 64 * GB)
    model = torch.nn.Linear(1000, 1000)  # ~4 MB of fp32 parameters
    config = load_config(RECIPE, ["batch_size=8", "device_memory_budget=0.25"])
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    budget = engine.loader_budget_bytes(model, config, accelerator, 64)
    reserved = 3 * engine.parameter_bytes(model) + engine.estimated_activation_bytes(8, 64)
    assert engine.parameter_bytes(model) == 1001000 * 4
    assert budget == int(0.25 * (64 * GB - reserved))


# ------------------------------------------------------------------ sharded evaluation


@pytest.mark.parametrize("n, world_size", [(10, 1), (10, 2), (10, 3), (7, 4), (2, 4), (0, 2)])
def test_eval_shares_are_equal_and_gather_back_in_order(n, world_size):
    indices = np.arange(100, 100 + n)
    shares = [engine.eval_share(indices, rank=rank, world_size=world_size) for rank in range(world_size)]
    assert len({len(part) for part, _ in shares}) == 1  # every process runs as many batches
    gathered = np.concatenate([part for part, _ in shares])
    assert all(count == n for _, count in shares)
    assert gathered[:n].tolist() == indices.tolist()


class IndexImages:
    """A loader whose 'image' is its index, remembering which indices it was asked for."""
    batch_size = 4

    def __init__(self):
        self.asked: list[int] = []

    def eval_batches(self, indices):
        self.asked += list(indices)
        for start in range(0, len(indices), self.batch_size):
            yield torch.as_tensor(indices[start:start + self.batch_size], dtype=torch.float32)[:, None]


def test_each_process_evaluates_its_share_and_all_get_every_probability_in_order():
    indices = np.array([9, 3, 7, 1, 8, 2, 6])  # a validation list, not sorted
    forward = lambda images: images  # logit = index
    outputs = {}
    for rank in (0, 1):
        outputs[rank] = IndexImages()
        accelerator = SimpleNamespace(process_index=rank, num_processes=2, autocast=contextlib.nullcontext,
                                      device=torch.device("cpu"))
        shares = {r: engine.eval_share(indices, rank=r, world_size=2)[0] for r in (0, 1)}
        # gather: rank 0's tensor then rank 1's, each computed from that rank's share
        accelerator.gather = lambda mine, rank=rank: torch.cat(
            [mine if r == rank else torch.sigmoid(torch.as_tensor(shares[r], dtype=torch.float32)) for r in (0, 1)])
        probs = engine.predict_probs(forward, torch.nn.Identity(), outputs[rank], indices, accelerator)
        assert probs.tolist() == pytest.approx(torch.sigmoid(torch.as_tensor(indices, dtype=torch.float32)).tolist())
    assert outputs[0].asked == [9, 3, 7, 1] and outputs[1].asked == [8, 2, 6, 6]  # halves, padded


# ------------------------------------------------------------------ checkpoint cadence


def test_checkpoint_cadence_decision():
    due = training.checkpoint_due
    assert due(epoch=3, final=True, every=5, seconds_since_save=0, save_seconds=10)
    assert [e for e in range(1, 9) if due(epoch=e, final=False, every=2, seconds_since_save=0, save_seconds=1)] == [2, 4, 6, 8]
    # Automatic: the first save of a process is due, then only after 20 x the last save's duration.
    assert due(epoch=1, final=False, every=0, seconds_since_save=0.0, save_seconds=None)
    assert not due(epoch=2, final=False, every=0, seconds_since_save=59.0, save_seconds=3.0)
    assert due(epoch=2, final=False, every=0, seconds_since_save=60.0, save_seconds=3.0)


def test_checkpoint_every_two_epochs_saves_those_and_the_last(phantom_shards, tmp_path, monkeypatch, capsys):
    saved_epochs = []
    save_checkpoint = training.save_checkpoint

    def recording(checkpoint, path):
        saved_epochs.append(checkpoint["progress"]["epoch"])
        save_checkpoint(checkpoint, path)

    monkeypatch.setattr(training, "save_checkpoint", recording)
    config = load_config(RECIPE, tiny(phantom_shards, tmp_path, epochs=5, checkpoint_every=2))
    assert training.train(config, progress_bar=False)["epochs"] == 5
    assert saved_epochs == [2, 4, 5]
    last = torch.load(tmp_path / "weights" / RECIPE / "last.pt", weights_only=False)
    assert last["progress"]["epoch"] == 5
    lines = [line for line in capsys.readouterr().out.splitlines() if " epoch " in line]
    assert "no last.pt yet" in lines[0] and "last.pt from epoch 2" in lines[2] and "last.pt saved" in lines[3]


# ------------------------------------------------------------------ optimiser


def fake_accelerator(num_processes: int):
    return SimpleNamespace(num_processes=num_processes, device=torch.device("cpu"), prepare=lambda *items: items)


@pytest.mark.parametrize("scaling, expected", [("none", 1e-3), ("linear", 4e-3)])
def test_lr_scaling_sets_the_optimisers_peak_lr(scaling, expected):
    config = load_config(RECIPE, ["lr=0.001", f"lr_scaling={scaling}", "pretrained=false"])
    _model, optimizer = engine.prepare_model(config, fake_accelerator(4), 64)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert engine.peak_lr(config, 4) == pytest.approx(expected)
    assert engine.peak_lr(config, 1) == pytest.approx(1e-3)


def test_fused_adamw_only_when_every_parameter_is_on_cuda():
    on_cuda = SimpleNamespace(device=torch.device("cuda", 0))
    on_cpu = torch.nn.Parameter(torch.zeros(2))
    assert engine.use_fused_adamw([on_cuda, on_cuda]) is True
    assert engine.use_fused_adamw([on_cuda, on_cpu]) is None
    assert engine.use_fused_adamw([on_cpu]) is None
    assert engine.use_fused_adamw([]) is None
    config = load_config(RECIPE, ["pretrained=false"])
    _model, optimizer = engine.prepare_model(config, fake_accelerator(1), 64)
    assert not optimizer.defaults.get("fused")


def test_cudnn_benchmark_on_cuda_unless_deterministic(monkeypatch, matmul_precision):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    engine.configure_backends(load_config(RECIPE), torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    engine.configure_backends(load_config(RECIPE), torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True
    engine.configure_backends(load_config(RECIPE, ["deterministic=true"]), torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is False


@pytest.fixture
def matmul_precision():
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


def test_precision_fp32_runs_matmuls_on_tf32_cores_on_cuda(matmul_precision):
    engine.configure_backends(load_config(RECIPE, ["precision=bf16"]), torch.device("cuda", 0))
    assert torch.get_float32_matmul_precision() == "highest"
    engine.configure_backends(load_config(RECIPE, ["precision=fp32"]), torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == "highest"  # a CPU's "high" could mean bf16 passes
    engine.configure_backends(load_config(RECIPE, ["precision=fp32"]), torch.device("cuda", 0))
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.allow_tf32


def test_activation_memory_is_measured_with_cudnn_autotuning_off(monkeypatch):
    """cuDNN's benchmark trials allocate workspaces that would inflate the measured peak."""
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 10 * GB)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: contextlib.nullcontext())
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seen = []
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    model[0].register_forward_hook(lambda *args: seen.append(torch.backends.cudnn.benchmark))
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    measured = engine.measured_activation_bytes(model, accelerator, 2, 8, channels_last=False)
    assert seen == [False] and torch.backends.cudnn.benchmark is True  # off while measuring, restored after
    assert measured == 10 * GB - engine.parameter_bytes(model)


def test_probabilities_are_fp32_whatever_the_logits_dtype():
    """bf16 has 8 mantissa bits: near 1, bf16 probabilities collapse onto a few values."""
    logits = torch.linspace(2.0, 6.0, 1000).unsqueeze(1)
    probs = engine.probabilities(logits.to(torch.bfloat16))
    assert probs.dtype == torch.float32
    assert probs.unique().numel() > 2 * torch.sigmoid(logits.to(torch.bfloat16)).unique().numel()


def test_evaluation_batches_are_larger_than_training_batches():
    config = load_config(RECIPE, ["batch_size=16"])
    assert engine.eval_batch_size(config) == 16 * engine.EVAL_BATCH_FACTOR > 16
