"""`python -m cxr_fast.bench`: the commands run with tiny settings and write well-formed results.

No timing is asserted: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_fast.bench.__main__ import main
from cxr_fast.bench.data import LOADERS
from cxr_fast.bench.records import DataResult, SuiteResult, TrainResult, read_record
from cxr_fast.bench.report import END, markdown_block, update_markdown
from cxr_fast.bench.suite import target_report

ROOT = Path(__file__).resolve().parents[1]


def is_rate(value: dict) -> bool:
    return (set(value) >= {"median", "min", "max", "spread", "values"} and value["min"] <= value["median"] <= value["max"]
            and value["min"] > 0)


@pytest.fixture(scope="module")
def data_result(phantom_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "data.json"
    argv = ["data", "--shards", str(phantom_shards), "--image-size", "32", "--batch-size", "8", "--repeats", "2",
            "--seconds", "0.1", "--warmup", "1", "--workers", "1", "--json", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def train_result(phantom_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "train.json"
    argv = ["train", "--arch", "test_resnet", "--loader", "resident", "--image-size", "32", "--batch-size", "8",
            "--steps", "2", "--repeats", "2", "--warmup", "1", "--precision", "fp32", "--shards", str(phantom_shards),
            "--json", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_data_bench_measures_every_loader(data_result):
    assert data_result["kind"] == "data"
    assert data_result["command"].startswith("python -m cxr_fast.bench data ")
    machine = data_result["machine"]
    assert machine["cpu"] and machine["usable_cores"] >= 1 and machine["libraries"]["torch"]
    assert set(data_result["loaders"]) == set(LOADERS)
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
    assert set(data_result["ratios"]) <= {"naive/wds", "dali-stock/wds", "dali/wds", "resident/wds", "host/resident"}
    assert "host/resident" in data_result["ratios"]
    startup = data_result["startup"]  # the decoded cache cold (built) and warm (mapped), same shards
    assert startup["load_size"] == 37 and startup["images"] == data_result["settings"]["shard_images"]
    assert is_rate(startup["cold_ms"]) and is_rate(startup["warm_ms"]) and startup["speedup"] > 1
    assert startup["command"].endswith("--loaders resident")


def test_missing_libraries_are_skipped_with_a_message(phantom_shards, monkeypatch, tmp_path):
    import cxr_fast.loading as loading

    monkeypatch.setattr(loading, "dali_available", lambda: False)
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import fails as if not installed
    out = tmp_path / "data.json"
    assert main(["data", "--shards", str(phantom_shards), "--image-size", "32", "--batch-size", "8",
                       "--repeats", "1", "--seconds", "0.1", "--warmup", "1", "--no-ceiling",
                       "--loaders", "wds,dali-stock,dali,resident", "--json", str(out)]) == 0
    loaders = json.loads(out.read_text())["loaders"]
    for name in ("wds", "dali-stock", "dali"):
        assert loaders[name]["status"] == "skipped" and "pip install" in loaders[name]["reason"]
    assert loaders["resident"]["status"] == "ok"


def test_unknown_loader_is_an_error(phantom_shards):
    from cxr_fast.errors import CxrError

    with pytest.raises(CxrError, match="unknown loader"):
        main(["data", "--shards", str(phantom_shards), "--loaders", "resident,fast"])


@pytest.mark.slow
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
    assert main(["train", "--arch", "test_convnext", "--loader", "synthetic", "--image-size", "32",
                       "--batch-size", "4", "--steps", "1", "--repeats", "1", "--warmup", "1", "--precision", "fp32",
                       "--no-channels-last", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "real" not in result and "efficiency" not in result and is_rate(result["synthetic"]["images_per_second"])
    assert result["settings"]["channels_last"] is False


@pytest.mark.slow
def test_suite_report_and_markdown(data_result, train_result, tmp_path):
    data, train = DataResult.from_json(data_result), TrainResult.from_json(train_result)
    results = SuiteResult(command="python -m cxr_fast.bench suite", date=data.date, machine=data.machine, data=data,
                          train=[train], wall_seconds=1.0)
    results.targets = target_report(results)
    assert any("training efficiency" in item.target for item in results.targets)
    assert any("warm vs cold" in item.target and item.value for item in results.targets)
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nhand-written analysis stays.\n")
    update_markdown(markdown, results, tmp_path / "x.json")
    update_markdown(markdown, results, tmp_path / "x.json")  # regenerated in place, not appended
    text = markdown.read_text()
    assert text.count("<!-- bench:begin") == 1 and text.count(END) == 1
    assert "hand-written analysis stays." in text
    for entry in data_result["loaders"].values():
        assert entry["command"] in text  # the command behind every number
    assert train_result["command"] in text and "images/s per core" in text
    assert data_result["startup"]["command"] in text and "decoded cache **cold" in text


@pytest.mark.slow
def test_records_read_back_what_they_wrote(data_result, train_result):
    assert DataResult.from_json(data_result).to_json() == data_result
    assert TrainResult.from_json(train_result).to_json() == train_result


def test_committed_results_still_read_and_render_as_in_benchmarks_md():
    """The files in benchmarks/results/ keep their format: read back unchanged, and the table in
    BENCHMARKS.md is what the writer makes of its results file."""
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    suites = [path for path in files if not path.name.startswith(("analyze-scale-", "analyze-coverage-"))]
    assert suites
    for path in suites:
        assert read_record(SuiteResult, path).to_json() == json.loads(path.read_text())
    committed = (ROOT / "BENCHMARKS.md").read_text()
    source = re.search(r"raw numbers: `([^`]+)`", committed).group(1)
    assert markdown_block(read_record(SuiteResult, ROOT / source), Path(source)) in committed


def test_committed_analysis_scale_results_carry_what_benchmarks_md_reports():
    """The analysis-at-scale files (python -m cxr_fast.analyze.scale_bench) are their own format:
    the size measured, the wall time, the peak memory and every report file's size."""
    files = sorted((ROOT / "benchmarks" / "results").glob("analyze-scale-*.json"))
    assert files
    for path in files:
        result = json.loads(path.read_text())
        assert result["benchmark"] == "analyze-scale"
        assert result["models"] > 0 and result["images_per_task"] > 0 and result["wall_s"] > 0
        assert result["peak_rss_mb"] > 0 and {"index.html", "summary.json"} <= set(result["report_files_mb"])
        assert result["command"].startswith("python -m cxr_fast.analyze ")


def test_committed_coverage_results_carry_what_benchmarks_md_reports():
    """The coverage study's files (python -m cxr_fast.analyze.coverage_bench): every cell's
    coverage before and after, and BENCHMARKS.md prints the command and table they hold."""
    from cxr_fast.analyze.coverage_bench import STATISTICS, markdown_table

    files = sorted((ROOT / "benchmarks" / "results").glob("analyze-coverage-*.json"))
    assert files
    committed = (ROOT / "BENCHMARKS.md").read_text()
    for path in files:
        result = json.loads(path.read_text())
        assert result["benchmark"] == "analyze-coverage" and result["cells"]
        assert result["command"].startswith("python -m cxr_fast.analyze.coverage_bench")
        for cell in result["cells"]:
            assert cell["replicates"] > 0 and set(cell["statistics"]) == set(STATISTICS)
        assert result["command"] in committed and markdown_table(result) in committed


def test_an_unreadable_results_file_is_a_one_line_error(tmp_path):
    from cxr_fast.errors import CxrError

    path = tmp_path / "cut.json"
    path.write_text('{"kind": "suite", "command": ')
    with pytest.raises(CxrError, match="cut.json: not a readable SuiteResult results file"):
        read_record(SuiteResult, path)


@pytest.mark.slow
def test_resume_command_on_cpu(phantom_shards, tmp_path):
    out = tmp_path / "resume.json"
    assert main(["resume", "--shards", str(phantom_shards), "--workdir", str(tmp_path), "--epochs", "2",
                 "--json", str(out), "image_size=32", "batch_size=8"]) == 0
    result = json.loads(out.read_text())
    assert result["ok"], result
    assert result["killed"] and result["resumed_after_epoch"] == result["epoch_at_kill"] == 1
    assert result["logged_epochs"] == [1, 2]
    assert result["command"].startswith("python -m cxr_fast.bench resume ") and "identical_weights" not in result


def test_resume_refuses_a_kill_after_the_last_epoch(phantom_shards, tmp_path):
    from cxr_fast.bench.resume import kill_and_resume
    from cxr_fast.errors import CxrError

    with pytest.raises(CxrError, match="epoch 2 of 2"):
        kill_and_resume(phantom_shards, tmp_path, epochs=2, kill_after_epoch=2)


@pytest.mark.slow  # worker processes / a subprocess
def test_gpu_check_script_is_the_python_command():
    script = ROOT / "tools" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                                                      "PYTHON": sys.executable})
    assert usage.returncode == 2 and "gpu-check" in usage.stderr and "out_dir" in usage.stderr


def test_make_bench_target():
    dry = subprocess.run(["make", "-n", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0 and "-m cxr_fast.bench suite" in dry.stdout


def test_train_bench_shows_progress_and_keeps_the_blocks_timed_before_a_stop(tmp_path, monkeypatch, capsys):
    import cxr_fast.bench.train as bench_train_module

    real_timed, calls = bench_train_module.timed, []

    def timed_then_interrupted(block, device):  # Ctrl-C in the second timed block
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_timed(block, device)

    monkeypatch.setattr(bench_train_module, "timed", timed_then_interrupted)
    out = tmp_path / "partial.json"
    assert main(["train", "--arch", "test_convnext", "--loader", "synthetic", "--image-size", "32",
                 "--batch-size", "4", "--steps", "1", "--repeats", "3", "--warmup", "1", "--precision", "fp32",
                 "--json", str(out)]) == 130
    result = json.loads(out.read_text())
    assert result["stopped"] == "stopped after 1 of 3 blocks"
    assert len(result["synthetic"]["images_per_second"]["values"]) == 1
    said = capsys.readouterr().err
    assert "bench train: warm-up: 1 steps per stream (synthetic)" in said and "block 1/3 (1 steps each): synthetic " in said
