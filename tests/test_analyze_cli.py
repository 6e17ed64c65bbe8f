"""`python -m cxr_fast.analyze`: clear one-line errors, and a self-contained report whose
summary.json records what the CSVs do not (settings, definitions, per-task summary) without repeating them."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re

import pandas as pd
import pytest

from cxr_fast.analyze import Settings, analyze
from cxr_fast.analyze.__main__ import main
from cxr_fast.errors import run_cli
from pred_fixtures import simulate_predictions, write_frames, write_pred_dir

TABLES = ("models", "subgroups", "consistency", "systematic", "systematic_images", "adjusted", "calibration")


def run_expecting_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


def cli_args(pred_dir, out, *extra: str) -> list[str]:
    return ["--pred-dir", str(pred_dir), "--out", str(out), "--bootstrap", "20", *extra]


def test_missing_columns_are_named_with_the_file(tmp_path, capsys):
    frame = simulate_predictions(n_images=50, archs=("resnet50",))
    pred_dir = write_frames(tmp_path / "all_pred", {"effusion_resnet50": frame.drop(columns=["prob", "race"])})
    message = run_expecting_error(cli_args(pred_dir, tmp_path / "out"), capsys)
    assert "effusion_resnet50.parquet" in message and "'prob'" in message and "'race'" in message


def test_empty_and_missing_directories(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no prediction files" in run_expecting_error(cli_args(tmp_path / "empty", tmp_path / "out"), capsys)
    assert "not found" in run_expecting_error(cli_args(tmp_path / "nowhere", tmp_path / "out"), capsys)


def test_models_of_one_task_with_different_test_sets(tmp_path, capsys):
    frame = simulate_predictions(tasks=("edema", "effusion"), archs=("resnet50", "densenet121"), n_images=60)
    frames = {recipe: rows for recipe, rows in frame.groupby("recipe")}
    frames["edema_densenet121"] = frames["edema_densenet121"].iloc[5:]  # five images fewer
    message = run_expecting_error(cli_args(write_frames(tmp_path / "all_pred", frames), tmp_path / "out"), capsys)
    assert "edema" in message and "differ" in message and ".parquet" in message


def test_two_files_with_the_same_task_and_arch(tmp_path, capsys):
    frame = simulate_predictions(tasks=("edema",), archs=("resnet50", "densenet121"), n_images=60)
    frames = {recipe: rows for recipe, rows in frame.groupby("recipe")}
    frames["edema_resnet50_again"] = frames["edema_resnet50"].assign(recipe="edema_resnet50_again")
    message = run_expecting_error(cli_args(write_frames(tmp_path / "all_pred", frames), tmp_path / "out"), capsys)
    assert "edema_resnet50_again.parquet" in message and "arch 'resnet50' is also in" in message
    assert "edema_resnet50.parquet" in message


def test_no_rows_for_the_split(tmp_path, capsys):
    pred_dir = write_pred_dir(tmp_path, n_images=40)
    message = run_expecting_error(cli_args(pred_dir, tmp_path / "out", "--split", "val"), capsys)
    assert "split == 'val'" in message and "test" in message and ".parquet" in message


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    pred_dir = write_pred_dir(root, tasks=("edema", "effusion"), n_images=300, n_val_images=40, seed=4)
    out = root / "reports" / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(cli_args(pred_dir, out, "--seed", "3")) == 0
    assert printed.getvalue().strip() == str(out / "index.html")  # the report path, last
    return pred_dir, out


def test_report_files(report):
    _, out = report
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["index.html", "summary.json", "gallery.csv"] + [f"{t}.csv" for t in TABLES] + [f"reliability_{t}.png" for t in ("edema", "effusion")])
    page = (out / "index.html").read_text()
    for task in ("edema", "effusion"):  # the diagram's file is the report's figure
        png = base64.b64encode((out / f"reliability_{task}.png").read_bytes()).decode("ascii")
        assert f'src="data:image/png;base64,{png}"' in page


def test_html_is_one_self_contained_file_with_figures(report):
    _, out = report
    page = (out / "index.html").read_text()
    assert "http" not in page and "<link" not in page and "<script" not in page and "url(" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    # ROC grid + one forest plot per task + 2 kappa figures + 3 composition charts + one reliability diagram per task.
    assert len(sources) == 1 + 2 + 2 + 3 + 2
    for heading in ("Headline findings", "How to read this report", "Subgroups", "Calibration", "Error consistency",
                    "Systematic misclassification"):
        assert heading in page
    assert page.index("Headline findings") < page.index("<h2>Models</h2>")


def test_summary_json_records_settings_and_does_not_repeat_the_csvs(report):
    pred_dir, out = report
    summary = json.loads((out / "summary.json").read_text())
    settings = summary["settings"]
    assert (settings["split"], settings["n_bootstrap"], settings["seed"]) == ("test", 20, 3)
    assert (settings["systematic_threshold"], settings["min_count"], settings["fdr"]) == (0.8, 30, 0.05)
    assert sorted(item["file"] for item in summary["inputs"]) == sorted(str(p) for p in pred_dir.glob("*.parquet"))
    assert summary["headline"] and "subgroup_family" in summary["definitions"]
    assert "tables" not in summary
    for table in TABLES:
        assert summary["files"][f"{table}.csv"] == len(pd.read_csv(out / f"{table}.csv"))
    flagged = pd.read_csv(out / "subgroups.csv").query("flagged")
    assert sum(row["models_flagged"] for row in summary["task_summary"]) == len(flagged)
    flagged = pd.read_csv(out / "calibration.csv").query("flagged")
    assert sum(row["models_flagged"] for row in summary["calibration_summary"]) == len(flagged)
    assert set(summary["findings"]) == {"adjusted", "explained", "unadjusted"}


def test_tables_are_reproducible_with_the_same_seed(report):
    pred_dir, out = report
    analysis = analyze(pred_dir=pred_dir, settings=Settings(n_bootstrap=20, seed=3))
    for table in TABLES:
        assert analysis.tables[table].to_csv(index=False) == (out / f"{table}.csv").read_text()


def test_probabilities_outside_zero_one_are_refused(tmp_path, capsys):
    frame = simulate_predictions(n_images=50, archs=("resnet50",))
    frame.loc[3, "prob"] = 1.7
    pred_dir = write_frames(tmp_path / "all_pred", {"effusion_resnet50": frame})
    message = run_expecting_error(cli_args(pred_dir, tmp_path / "out"), capsys)
    assert "effusion_resnet50.parquet" in message and "[0, 1]" in message and "1.7" in message


def test_pred_that_contradicts_the_threshold_is_refused(tmp_path, capsys):
    frame = simulate_predictions(n_images=50, archs=("resnet50",))
    row = frame.index[frame["prob"] > 0.9][0]
    frame.loc[row, "pred"] = 0  # prob > threshold 0.5, yet predicted negative
    pred_dir = write_frames(tmp_path / "all_pred", {"effusion_resnet50": frame})
    message = run_expecting_error(cli_args(pred_dir, tmp_path / "out"), capsys)
    assert "effusion_resnet50.parquet" in message and "contradicts" in message and frame.loc[row, "key"] in message


def test_files_without_view_are_read_with_view_unknown(tmp_path):
    frame = simulate_predictions(n_images=80, archs=("resnet50", "densenet121"))
    assert set(frame["view"]) == {"AP", "PA"}
    pred_dir = write_frames(tmp_path / "all_pred", {r: rows.drop(columns="view") for r, rows in frame.groupby("recipe")})
    analysis = analyze(pred_dir=pred_dir, settings=Settings(n_bootstrap=5))
    views = analysis.tables["subgroups"].query("attribute == 'view'")["group"]
    assert set(views) == {"Unknown"}


def test_a_failure_midway_leaves_the_old_report_whole(report, tmp_path, monkeypatch):
    pred_dir, out = report
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    analysis = analyze(pred_dir=pred_dir, settings=Settings(n_bootstrap=20, seed=99))  # other numbers than the report's
    import cxr_fast.analyze.report as report_module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_module, "write_json", fail)  # after the CSVs, before index.html
    from cxr_fast.errors import CxrError

    with pytest.raises(CxrError, match=f"^{out}: disk full$"):  # an OS error is one line naming the report
        report_module.write_report(analysis=analysis, out=out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert [path.name for path in out.parent.iterdir()] == [out.name]  # no temporary left beside it


def test_the_report_does_not_replace_a_folder_that_is_not_a_report(report, tmp_path):
    pred_dir, _ = report
    (tmp_path / "mine.txt").write_text("keep me")
    analysis = analyze(pred_dir=pred_dir, settings=Settings(n_bootstrap=5))
    from cxr_fast.analyze.report import write_report
    from cxr_fast.errors import CxrError

    with pytest.raises(CxrError, match="not a previous report"):
        write_report(analysis=analysis, out=tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_prediction_files_of_an_unknown_task_are_refused(tmp_path, capsys):
    frame = simulate_predictions(tasks=("edema",), archs=("resnet50",), n_images=50)
    unknown = frame.assign(task="appendicitis", recipe="appendicitis_resnet50")
    pred_dir = write_frames(tmp_path / "all_pred", {"edema_resnet50": frame, "appendicitis_resnet50": unknown})
    message = run_expecting_error(cli_args(pred_dir, tmp_path / "out"), capsys)
    assert message == (f"error: {pred_dir / 'appendicitis_resnet50.parquet'}: unknown task 'appendicitis'; "
                       "known: cardiomegaly, effusion, edema, fracture, pneumonia, no_finding")
    assert not (tmp_path / "out").exists()
