"""`sweep --plan`: images per balanced epoch, validation images and hours from measured throughput."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cxr_fast.errors import CxrError
from cxr_fast.sweep import main


def fabricated_shards(folder: Path) -> Path:
    """effusion: train 30 positives / 70 negatives / 5 unlabelled, val 20 labelled + 3 unlabelled."""
    folder.mkdir(parents=True)
    labels = [1.0] * 30 + [0.0] * 70 + [None] * 5 + [1.0] * 8 + [0.0] * 12 + [None] * 3
    splits = ["train"] * 105 + ["val"] * 23
    rows = pd.DataFrame({"key": [f"k{i}" for i in range(len(labels))], "split": splits, "shard": "train-000000.tar",
                         "offset": 0, "nbytes": 1, "effusion": labels})
    rows.to_parquet(folder / "manifest.parquet")
    (folder / "meta.json").write_text(json.dumps({"arguments": {"size": 256}}))
    return folder


def throughput_file(path: Path, rates: dict[str, float], gpu: str | None = None) -> Path:
    def entry(arch, rate):
        measured = {"images_per_second": {"median": rate, "min": rate, "max": rate, "spread": 0, "values": [rate]}}
        return {"kind": "train", "command": "x", "settings": {"arch": arch}, "synthetic": measured, "real": measured,
                "machine": {"gpu": {"name": gpu} if gpu else None, "cpu": "Intel Xeon", "cpu_count": 2}}
    path.write_text(json.dumps({"kind": "suite", "train": [entry(arch, rate) for arch, rate in rates.items()]}))
    return path


def test_plan_counts_images_and_hours(tmp_path, capsys):
    shards = fabricated_shards(tmp_path / "shards")
    rates = throughput_file(tmp_path / "rates.json", {"resnet50": 10.0})
    assert main(["--tasks", "effusion", "--archs", "resnet50,densenet121", "--plan", "--throughput", str(rates),
                 f"shards={shards}", "epochs=4"]) == 0
    out = capsys.readouterr().out
    resnet = next(line for line in out.splitlines() if line.startswith("effusion_resnet50"))
    # 2 x 30 positives per epoch, 20 validation images at 3x the rate: 4 x (60 + 20/3) / 10 s = 26.7 s
    assert resnet.split()[1:5] == ["60", "20", "4", "10"]
    assert resnet.split()[5] == f"{4 * (60 + 20 / 3) / 10 / 3600:.2f}"
    densenet = next(line for line in out.splitlines() if line.startswith("effusion_densenet121"))
    assert densenet.split()[4:6] == ["unknown", "unknown"]
    assert "unknown for densenet121" in out and str(rates) in out


def test_plan_sizes_the_slurm_time(tmp_path, capsys):
    shards = fabricated_shards(tmp_path / "shards")
    rates = throughput_file(tmp_path / "rates.json", {"resnet50": 0.01})  # 4 x 66.7 / 0.01 s = 7.4 h
    script = tmp_path / "study.sbatch"
    assert main(["--tasks", "effusion", "--archs", "resnet50", "--plan", "--throughput", str(rates), "--slurm",
                 str(script), "--logs", str(tmp_path / "logs"), f"shards={shards}", "epochs=4"]) == 0
    hours = 4 * (60 + 20 / 3) / 0.01 / 3600 * 1.25
    minutes = -(-round(hours * 60 * 1e6) // 10**6)
    assert f"#SBATCH --time={minutes // 60:02d}:{minutes % 60:02d}:00" in script.read_text()


def test_plan_without_measurement_for_any_arch_keeps_the_default_time(tmp_path, capsys):
    shards = fabricated_shards(tmp_path / "shards")
    rates = throughput_file(tmp_path / "rates.json", {"resnet50": 100.0})
    script = tmp_path / "study.sbatch"
    main(["--tasks", "effusion", "--archs", "densenet121", "--plan", "--throughput", str(rates), "--slurm",
          str(script), "--logs", str(tmp_path / "logs"), f"shards={shards}"])
    assert "#SBATCH --time=48:00:00" in script.read_text()


def test_a_file_without_measurements_is_refused(tmp_path):
    shards = fabricated_shards(tmp_path / "shards")
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(CxrError, match="empty.json: no `bench train` measurement"):
        main(["--tasks", "effusion", "--archs", "resnet50", "--plan", "--throughput", str(empty), f"shards={shards}"])


def plan_line(out: str, recipe: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith(recipe)).split()


def test_plan_shows_validations_share_and_the_effect_of_val_every(tmp_path, capsys):
    shards = fabricated_shards(tmp_path / "shards")
    rates = throughput_file(tmp_path / "rates.json", {"resnet50": 10.0})
    common = ["--tasks", "effusion", "--archs", "resnet50", "--plan", "--throughput", str(rates), f"shards={shards}",
              "epochs=4"]
    assert main(common) == 0
    every = plan_line(capsys.readouterr().out, "effusion_resnet50")
    # 4 validations of 20 images at 3x the rate beside 4 epochs of 60: 26.7 of 266.7 image-units
    assert every[6:8] == ["4", f"{100 * (80 / 3) / (240 + 80 / 3):.1f}%"]
    assert main([*common, "val_every=3"]) == 0  # epochs 3 and 4 (the last) are validated
    out = capsys.readouterr().out
    sparse = plan_line(out, "effusion_resnet50")
    assert sparse[5:8] == [f"{(240 + 40 / 3) / 10 / 3600:.2f}", "2", f"{100 * (40 / 3) / (240 + 40 / 3):.1f}%"]
    assert f"({100 * (40 / 3) / (240 + 40 / 3):.1f}%), val_every=3" in out
    assert "floor: unknown (no bf16 peak known for a CPU" in out


def test_plan_gives_the_floor_at_the_measured_devices_peak(tmp_path, capsys, monkeypatch):
    import cxr_fast.study_plan as plan

    counted = []
    monkeypatch.setattr(plan, "forward_flops", lambda arch, size: counted.append((arch, size)) or 1e9)
    shards = fabricated_shards(tmp_path / "shards")
    rates = throughput_file(tmp_path / "rates.json", {"resnet50": 10.0}, gpu="NVIDIA H100 80GB HBM3")
    assert main(["--tasks", "effusion", "--archs", "resnet50", "--plan", "--throughput", str(rates),
                 f"shards={shards}", "epochs=4", "image_size=160"]) == 0
    out = capsys.readouterr().out
    flops = 1e9 * (4 * 60 * 3 + 4 * 20)  # training images x (forward + 2 x forward), validation x forward
    floor_hours = flops / 989e12 / 3600
    assert plan_line(out, "effusion_resnet50")[8] == f"{floor_hours:.3f}"
    assert f"floor: {flops:.2e} FLOPs = {floor_hours:.2f} hours at the 989 TFLOP/s bf16 peak of NVIDIA H100" in out
    hours = 4 * (60 + 20 / 3) / 10 / 3600
    assert f"the measured hours are {hours / floor_hours:.1f}x it" in out
    assert counted == [("resnet50", 160)]


def test_device_peaks_and_counted_flops():
    from cxr_fast.flops import forward_flops, peak_flops, training_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops(None) is None and peak_flops("Tesla K80") is None
    small, large = forward_flops("test_resnet", 64), forward_flops("test_resnet", 128)
    assert small > 0 and 3.5 < large / small < 4.5  # convolutions: FLOPs grow with the pixel count
    assert training_flops("test_resnet", 64) == 3 * small


@pytest.mark.parametrize(("gpu", "device"), [(None, "CPU (Intel Xeon, 2 cores)"), ("NVIDIA H100 80GB HBM3", "NVIDIA H100")])
def test_plan_names_the_device_its_hours_were_measured_on(tmp_path, capsys, gpu, device):
    shards = fabricated_shards(tmp_path / "shards")
    rates = throughput_file(tmp_path / "rates.json", {"resnet50": 10.0}, gpu=gpu)
    assert main(["--tasks", "effusion", "--archs", "resnet50", "--plan", "--throughput", str(rates),
                 f"shards={shards}"]) == 0
    out = capsys.readouterr().out
    assert "GPU-h" not in out and "hours" in out.splitlines()[0].split()
    total = next(line for line in out.splitlines() if line.startswith("total:"))
    assert f"hours on {device}" in total and f"measured on {device}" in out


def test_the_newest_results_file_is_the_one_measured_last_not_the_last_touched(tmp_path):
    """A fresh clone gives every results file the same modification time: the recorded date decides."""
    import os

    from cxr_fast.study_plan import newest_results

    older = throughput_file(tmp_path / "b-older.json", {"resnet50": 1.0})
    newer = throughput_file(tmp_path / "a-newer.json", {"resnet50": 2.0})
    for path, date in ((older, "2026-11-25T19:05:43+00:00"), (newer, "2026-12-02T23:44:47+00:00")):
        path.write_text(json.dumps(json.loads(path.read_text()) | {"date": date}))
    os.utime(newer, (1_000_000, 1_000_000))  # touched before the older measurement
    assert newest_results(tmp_path) == newer
    assert newest_results(tmp_path, device="NVIDIA H100") is None  # CPU measurements only
