"""`python -m cxr_fast.bench gpu-check`: the preflight's verdicts, the optional imports, and the
whole check with tiny settings on the CPU (the same code a GPU runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxr_fast.bench import gpu_check
from cxr_fast.errors import CxrError

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("nvidia.dali", "webdataset", "wandb", "numba")  # absent from a GPU image's own python3 (numba: only the analysis needs it)

SMI_BANNER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.104.05             Driver Version: 535.104.05   CUDA Version: 12.2     |
|-----------------------------------------+------------------------+----------------------+
"""


def without_gpu(monkeypatch, *, torch_cuda: str | None, smi: str | None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(gpu_check, "nvidia_smi", lambda: smi)


def test_cuda_build_newer_than_the_driver_names_both_versions(monkeypatch):
    without_gpu(monkeypatch, torch_cuda="13.0", smi=SMI_BANNER)
    with pytest.raises(CxrError) as error:
        gpu_check.preflight(tiny=False)
    message = str(error.value)
    assert "\n" not in message and "CUDA 13.0" in message and "535.104.05" in message and "12.2" in message


def test_cuda_build_without_a_driver_says_so(monkeypatch):
    without_gpu(monkeypatch, torch_cuda="12.8", smi=None)
    with pytest.raises(CxrError, match="CUDA 12.8.*nvidia-smi is missing"):
        gpu_check.preflight(tiny=False)


def test_cpu_build_is_never_a_gpu_check(monkeypatch):
    without_gpu(monkeypatch, torch_cuda=None, smi=None)
    with pytest.raises(CxrError, match="CPU-only build"):
        gpu_check.preflight(tiny=False)


def test_command_exits_non_zero_without_a_gpu_and_writes_nothing(monkeypatch, tmp_path, capsys):
    from cxr_fast.bench.__main__ import main
    from cxr_fast.errors import run_cli

    without_gpu(monkeypatch, torch_cuda="13.0", smi=SMI_BANNER)
    with pytest.raises(SystemExit) as exited:
        run_cli(main, ["gpu-check", str(tmp_path / "out")])
    assert exited.value.code != 0
    assert capsys.readouterr().err.strip().startswith("error: no GPU")
    assert not (tmp_path / "out" / gpu_check.RESULT_FILE).exists()


def test_tiny_runs_on_a_cpu(monkeypatch):
    without_gpu(monkeypatch, torch_cuda="13.0", smi=None)
    assert gpu_check.preflight(tiny=True)["device"] == "cpu"


def test_missing_compiler_or_headers_skips_compilation(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert "no C compiler" in gpu_check.compiler_missing()
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(gpu_check.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert "Python.h" in gpu_check.compiler_missing()
    (tmp_path / "Python.h").write_text("")
    assert gpu_check.compiler_missing() is None


def blocking_site(folder: Path) -> dict:
    """An environment whose Python cannot import DALI, webdataset, wandb or numba (a GPU image's python3)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\nfor name in %r:\n    sys.modules[name] = None  # import fails, find_spec says absent\n" % (OPTIONAL,))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]), "WANDB_MODE": "disabled"}


@pytest.mark.slow  # worker processes / a subprocess
def test_gpu_check_import_chain_needs_no_optional_package(tmp_path):
    code = ("import importlib.util, sys\n"
            "assert importlib.util.find_spec('webdataset') is None\n"
            "import cxr_fast.bench.__main__, cxr_fast.bench.gpu_check, cxr_fast.bench.data, cxr_fast.bench.train\n"
            "import cxr_fast.bench.resume, cxr_fast.train, cxr_fast.predict, cxr_fast.loading.resident\n"
            "from cxr_fast.loading import dali_available\n"
            "assert not dali_available()\n")
    done = subprocess.run([sys.executable, "-c", code], env=blocking_site(tmp_path / "site"), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_tiny_gpu_check_on_cpu_writes_every_part(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "cxr_fast.bench", "gpu-check", str(out), "--tiny"],
                          env=blocking_site(tmp_path / "site"), capture_output=True, text=True, cwd=tmp_path)
    result = json.loads((out / gpu_check.RESULT_FILE).read_text())
    assert done.returncode == 0, done.stderr[-3000:]
    assert result["kind"] == "gpu-check" and result["tiny"] is True
    assert result["machine"]["cpu"] and result["result_name"].endswith(".json")
    assert set(result["parts"]) == {"shards", *gpu_check.PARTS}
    for name, part in result["parts"].items():
        assert part["status"] == "ok" or (part["status"] == "skipped" and part["reason"]), (name, part)
    assert result["parts"]["dali"]["status"] == "skipped" and "nvidia-dali" in result["parts"]["dali"]["reason"]
    resume = result["parts"]["train"]["result"]["resume"]
    assert resume["ok"] and resume["resumed_after_epoch"] == 1 and resume["logged_epochs"] == [1, 2]
    assert result["parts"]["train"]["result"]["predict"]["rows"] > 0
    assert result["parts"]["loader"]["result"]["resident"]["images_per_second"]["median"] > 0
    assert result["parts"]["efficiency"]["result"]["test_resnet eager"]["efficiency"] > 0
    assert result["targets"] == {}  # a CPU run meets or misses no GPU target
    host = result["parts"]["loader"]["result"]["host"]
    assert host.get("images_per_second") or (host["status"] == "skipped" and host["reason"])
    assert any("several GPUs" in item and "NCCL" in item for item in result["not_covered"])
    from PIL import Image

    phantom = next((out / "work" / "data").glob("phantom-*-portrait1.2"))
    with Image.open(next(phantom.rglob("*.jpg"))) as image:  # non-square, like MIMIC's
        assert image.height == round(1.2 * image.width)


def test_only_resnet50_and_convnext_large_compile():
    runs = gpu_check.efficiency_runs(gpu_check.Scale(), compile=True)
    assert runs[:5] == [(arch, False) for arch in gpu_check.EFFICIENCY_ARCHS]
    assert runs[5:] == [("resnet50", True), ("convnext_large", True)]
    assert all(not compiled for _arch, compiled in gpu_check.efficiency_runs(gpu_check.Scale(), compile=False))
    assert all(not compiled for _arch, compiled in gpu_check.efficiency_runs(gpu_check.TINY, compile=True))


def process_is_gone(pid: int) -> bool:
    """Exited (a zombie waiting to be reaped counts: it runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_a_timed_out_part_is_killed_with_the_processes_it_started(tmp_path):
    """A part's child (the training run of the `train` part) dies with the part."""
    import time

    from cxr_fast.bench.machine import start_logged, wait_or_kill

    pid_file = tmp_path / "grandchild.pid"
    part = ("import sys, time, pathlib\n"
            "from cxr_fast.bench.machine import start_logged\n"
            "child = start_logged([sys.executable, '-c', 'import time; time.sleep(300)'], pathlib.Path(sys.argv[2]))\n"
            "pathlib.Path(sys.argv[1]).write_text(str(child.pid))\n"
            "time.sleep(300)\n")
    process = start_logged([sys.executable, "-c", part, str(pid_file), str(tmp_path / "child.log")],
                           tmp_path / "part.log", own_group=True)
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert wait_or_kill(process, 0.1) is None
    deadline = time.monotonic() + 30
    while not process_is_gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_is_gone(grandchild)
