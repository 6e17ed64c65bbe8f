"""`python -m cxr_fast.bench`: the commands run with tiny settings and write well-formed results.

No timing is asserted: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_fast import bench

ROOT = Path(__file__).resolve().parents[1]


def is_rate(value: dict) -> bool:
    return (set(value) >= {"median", "min", "max", "spread", "values"} and value["min"] <= value["median"] <= value["max"]
            and value["min"] > 0)


@pytest.fixture(scope="module")
def data_result(phantom_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "data.json"
    argv = ["data", "--shards", str(phantom_shards), "--image-size", "32", "--batch-size", "8", "--repeats", "2",
            "--seconds", "0.1", "--warmup", "1", "--workers", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def train_result(phantom_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "train.json"
    argv = ["train", "--arch", "test_resnet", "--loader", "resident", "--image-size", "32", "--batch-size", "8",
            "--steps", "2", "--repeats", "2", "--warmup", "1", "--precision", "fp32", "--shards", str(phantom_shards),
            "--json", str(out)]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_data_bench_measures_every_loader(data_result):
    assert data_result["kind"] == "data"
    assert data_result["command"].startswith("python -m cxr_fast.bench data ")
    machine = data_result["machine"]
    assert machine["cpu"] and machine["usable_cores"] >= 1 and machine["libraries"]["torch"]
    assert set(data_result["loaders"]) == set(bench.LOADERS)
    for name, entry in data_result["loaders"].items():
        assert entry["command"].endswith(f"--loaders {name}")
        if entry["status"] == "skipped":  # only when its library is missing
            assert "not installed" in entry["reason"]
            continue
        assert entry["status"] == "ok", entry
        assert is_rate(entry["images_per_second"]) and entry["setup_seconds"] >= 0 and entry["batches_per_repeat"] >= 2
    ceiling = data_result["decode_ceiling"]
    assert is_rate(ceiling["images_per_second_per_core"]) and ceiling["ceiling_images_per_second"] > 0
    assert ceiling["jpeg_kb_mean"] > 0
    assert set(data_result["ratios"]) <= {"naive/wds", "dali-stock/wds", "dali/wds", "resident/wds"}


def test_missing_libraries_are_skipped_with_a_message(phantom_shards, monkeypatch, tmp_path):
    import cxr_fast.loading as loading

    monkeypatch.setattr(loading, "dali_available", lambda: False)
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import fails as if not installed
    out = tmp_path / "data.json"
    assert bench.main(["data", "--shards", str(phantom_shards), "--image-size", "32", "--batch-size", "8",
                       "--repeats", "1", "--seconds", "0.1", "--warmup", "1", "--no-ceiling",
                       "--loaders", "wds,dali-stock,dali,resident", "--json", str(out)]) == 0
    loaders = json.loads(out.read_text())["loaders"]
    for name in ("wds", "dali-stock", "dali"):
        assert loaders[name]["status"] == "skipped" and "pip install" in loaders[name]["reason"]
    assert loaders["resident"]["status"] == "ok"


def test_unknown_loader_is_an_error(phantom_shards):
    from cxr_fast.errors import CxrError

    with pytest.raises(CxrError, match="unknown loader"):
        bench.main(["data", "--shards", str(phantom_shards), "--loaders", "resident,fast"])


def test_train_bench_real_and_synthetic(train_result):
    assert train_result["kind"] == "train"
    settings = train_result["settings"]
    assert settings["arch"] == "test_resnet" and settings["loader_used"] == "resident"
    assert settings["image_size"] == 32 and settings["batch_size"] == 8 and settings["mixed_precision"] == "no"
    assert is_rate(train_result["real"]["images_per_second"]) and is_rate(train_result["synthetic"]["images_per_second"])
    assert train_result["efficiency"] > 0
    assert "--arch test_resnet" in train_result["command"]


def test_train_bench_synthetic_only_needs_no_shards(tmp_path):
    out = tmp_path / "synthetic.json"
    assert bench.main(["train", "--arch", "test_convnext", "--loader", "synthetic", "--image-size", "32",
                       "--batch-size", "4", "--steps", "1", "--repeats", "1", "--warmup", "1", "--precision", "fp32",
                       "--no-channels-last", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "real" not in result and "efficiency" not in result and is_rate(result["synthetic"]["images_per_second"])
    assert result["settings"]["channels_last"] is False


def test_suite_report_and_markdown(data_result, train_result, tmp_path):
    results = {"kind": "suite", "command": "python -m cxr_fast.bench suite", "date": data_result["date"],
               "machine": data_result["machine"], "data": data_result, "train": [train_result], "wall_seconds": 1.0}
    results["targets"] = bench.target_report(results)
    assert any("training efficiency" in item["target"] for item in results["targets"])
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nhand-written analysis stays.\n")
    bench.update_markdown(markdown, results, tmp_path / "x.json")
    bench.update_markdown(markdown, results, tmp_path / "x.json")  # regenerated in place, not appended
    text = markdown.read_text()
    assert text.count("<!-- bench:begin") == 1 and text.count(bench.END) == 1
    assert "hand-written analysis stays." in text
    for entry in data_result["loaders"].values():
        assert entry["command"] in text  # the command behind every number
    assert train_result["command"] in text and "images/s per core" in text


def test_resume_check_on_cpu(phantom_shards, tmp_path):
    out = tmp_path / "resume.json"
    assert bench.main(["resume", "--shards", str(phantom_shards), "--workdir", str(tmp_path), "--epochs", "2",
                       "--json", str(out), "image_size=32", "batch_size=8"]) == 0
    result = json.loads(out.read_text())
    assert result["ok"], result
    assert result["killed"] and result["resumed_after_epoch"] == result["epoch_at_kill"] == 1
    assert result["logged_epochs"] == [1, 2]


def test_gpu_check_script_parses():
    script = ROOT / "tools" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_make_bench_target():
    dry = subprocess.run(["make", "-n", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0 and "-m cxr_fast.bench suite" in dry.stdout
