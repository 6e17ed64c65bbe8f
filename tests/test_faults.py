"""Every fault one line naming the path: full disks and read-only folders for real (tmpfs, a
read-only bind mount), garbage weights and records; nothing written earlier is damaged. And
identical weights give identical best.safetensors bytes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from cxr_fast.analyze.__main__ import main as analyze_main
from cxr_fast.checkpoint import save_checkpoint
from cxr_fast.data import shard_dataset, shards
from cxr_fast.errors import CxrError, run_cli
from cxr_fast.io import TEMPORARY_MARK, write_json
from cxr_fast.models import build_model
from cxr_fast.predict import predict
from cxr_fast.recipes import load_config
from cxr_fast.train import save_best
from conftest import shard_arguments
from mounts import fill, read_only, tiny_disk
from pred_fixtures import write_pred_dir

RECIPE = "effusion_test_resnet"
NO_SPACE = r"no space left on device \(needed about \d+ MB\)"


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def files(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# ------------------------------------------------------------------ sharding


def test_sharding_onto_a_full_disk_is_one_line_and_keeps_the_finished_shards(phantom_root, tmp_path):
    with tiny_disk(tmp_path / "disk") as disk:
        out = disk / "shards"
        with pytest.raises(CxrError) as caught:
            shard_dataset.main(shard_arguments(phantom_root, out))
        assert re.fullmatch(rf"{out}/[a-z]+-\d{{6}}\.(tar|idx|json): {NO_SPACE}", one_line(caught)), caught.value
        assert not [path for path in out.rglob("*") if TEMPORARY_MARK in path.name]
        for marker in (out / shards.PARTS_DIR).glob("*-*.json"):
            part = json.loads(marker.read_text())
            assert hashlib.sha256((out / part["shard"]).read_bytes()).hexdigest() == part["sha256"]


# ------------------------------------------------------------------ training's checkpoints


def test_a_checkpoint_on_a_full_disk_is_the_no_space_line_and_keeps_the_last_one(tmp_path):
    with tiny_disk(tmp_path / "disk") as disk:
        path = disk / "weights" / "last.pt"
        save_checkpoint({"model": {"w": torch.zeros(10)}}, path)
        before = path.read_bytes()
        with pytest.raises(CxrError) as caught:
            save_checkpoint({"model": {"w": torch.zeros(2_000_000)}}, path)  # 8 MB on a 1 MB disk
        assert one_line(caught) == f"{path}: no space left on device (needed about 8 MB)"
        assert path.read_bytes() == before
        assert [item.name for item in path.parent.iterdir()] == ["last.pt"]


def test_best_weights_on_a_full_disk_are_the_no_space_line(tmp_path):
    with tiny_disk(tmp_path / "disk") as disk:
        model = torch.nn.Linear(1000, 1000)  # 4 MB
        config = {"recipe": RECIPE}
        with pytest.raises(CxrError) as caught:
            save_best(model, disk / RECIPE, {"epoch": 1, "config": config})
        assert re.fullmatch(rf"{disk / RECIPE / 'best.safetensors'}: {NO_SPACE}", one_line(caught))


def test_identical_weights_give_identical_best_safetensors(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    record = {"epoch": 3, "config": {"recipe": RECIPE}, "threshold": 0.5}
    written = set()
    for attempt in range(6):  # the metadata order was a coin toss per file
        save_best(model, tmp_path / str(attempt), record)
        written.add((tmp_path / str(attempt) / "best.safetensors").read_bytes())
    assert len(written) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0" / "best.safetensors"), "pt") as handle:
        assert handle.metadata() == {"epoch": "3", "recipe": RECIPE}
        assert torch.equal(handle.get_tensor("0.weight"), model.state_dict()["0.weight"])


# ------------------------------------------------------------------ prediction


@pytest.fixture()
def best_run(phantom_shards, tmp_path) -> dict:
    """A recipe folder as training leaves it (untrained weights: prediction only reads them)."""
    settings = {"shards": str(phantom_shards), "weights_dir": str(tmp_path / "weights")}
    config = load_config(RECIPE, settings)
    model = build_model(config.arch, pretrained=False, image_size=config.resolved_image_size)
    save_best(model, config.weights_path, {"epoch": 1, "threshold": 0.5, "config": config.to_dict()})
    return settings | {"folder": config.weights_path}


def run_predict(best_run: dict, out_dir: Path) -> Path:
    return predict(RECIPE, {key: value for key, value in best_run.items() if key != "folder"}, out_dir=out_dir)


@pytest.mark.parametrize("name, garbage, problem", [
    ("best.safetensors", b"\xff" * 64, "not a safetensors file"),
    ("best.json", b"{\"epoch\": 1, ", "not a JSON file"),
    ("best.json", b"[1, 2]", "not a best-epoch record (missing config, threshold)"),
])
def test_garbage_weights_or_record_are_one_line_naming_the_file(best_run, tmp_path, name, garbage, problem):
    (best_run["folder"] / name).write_bytes(garbage)
    with pytest.raises(CxrError) as caught:
        run_predict(best_run, tmp_path / "pred")
    assert one_line(caught).startswith(f"{best_run['folder'] / name}: {problem}")


def test_predicting_into_a_read_only_folder_is_one_line_and_keeps_earlier_predictions(best_run, tmp_path):
    out_dir = tmp_path / "pred"
    path = run_predict(best_run, out_dir)
    before = files(out_dir)
    with read_only(out_dir):
        with pytest.raises(CxrError) as caught:
            run_predict(best_run, out_dir)
        assert one_line(caught) == f"{path}: read-only file system"
    assert files(out_dir) == before


def test_predicting_onto_a_full_disk_is_the_no_space_line_and_keeps_earlier_predictions(best_run, tmp_path):
    with tiny_disk(tmp_path / "disk", size="2M") as disk:
        path = run_predict(best_run, disk)
        before = path.read_bytes()
        fill(disk)
        with pytest.raises(CxrError) as caught:
            run_predict(best_run, disk)
        assert re.fullmatch(rf"{path}: {NO_SPACE}", one_line(caught)), caught.value
        assert path.read_bytes() == before


# ------------------------------------------------------------------ the analysis


def analyze_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(analyze_main, argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message
    return message.removeprefix("error: ")


@pytest.fixture()
def pred_dir(tmp_path) -> Path:
    return write_pred_dir(tmp_path, tasks=("edema",), archs=("resnet50", "densenet121"), n_images=60)


def test_a_report_into_a_read_only_folder_is_one_line_and_keeps_the_old_report(pred_dir, tmp_path, capsys):
    out = tmp_path / "reports" / "demo"
    out.mkdir(parents=True)
    write_json(out / "summary.json", {"earlier": True})
    with read_only(tmp_path / "reports"):
        assert analyze_error(["--pred-dir", str(pred_dir), "--out", str(out), "--bootstrap", "20"], capsys) == \
            f"{out}: read-only file system"
    assert json.loads((out / "summary.json").read_text()) == {"earlier": True}


def test_a_report_onto_a_full_disk_is_the_no_space_line(pred_dir, tmp_path, capsys):
    with tiny_disk(tmp_path / "disk") as disk:
        out = disk / "report"
        fill(disk)
        message = analyze_error(["--pred-dir", str(pred_dir), "--out", str(out), "--bootstrap", "20"], capsys)
        assert message.startswith(f"{out}") and "no space left on device" in message, message
        assert TEMPORARY_MARK not in message
        assert [path.name for path in disk.iterdir()] == ["filler"]


def test_sharding_into_a_read_only_folder_is_one_line(phantom_root, tmp_path):
    with read_only(tmp_path / "ro"):
        out = tmp_path / "ro" / "shards"
        with pytest.raises(CxrError) as caught:
            shard_dataset.main(shard_arguments(phantom_root, out))
        assert one_line(caught) == f"{out}: cannot write here (read-only file system)"
