"""The stage scaffold (stages/stage_runtime.py): dvclive on rank 0, final metrics, user errors."""

import csv
import json

import pytest

from conftest import load_stage_module

stage_runtime = load_stage_module("stage_runtime")


@pytest.fixture(autouse=True)
def outside_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dvclive looks for a repo from the working directory
    monkeypatch.delenv("RANK", raising=False)


def training(run):
    run.log(0, {"loss": 3.0, "lr": 0.5})
    run.log(2, {"loss": 2.0})
    return {**run.final, "parameters": 7}


def test_logs_steps_with_dvclive_and_writes_the_final_metrics(tmp_path, capsys):
    live, metrics = tmp_path / "live", tmp_path / "metrics.json"
    code = stage_runtime.run_stage(
        "toy", training, live=str(live), log_prefix="vq/", metrics=str(metrics)
    )
    assert code == 0
    written = json.loads(metrics.read_text())
    assert set(written) == {"vq/loss", "vq/lr", "parameters", "stage_seconds"}
    assert (written["vq/loss"], written["vq/lr"], written["parameters"]) == (2.0, 0.5, 7)
    assert capsys.readouterr().out == f"toy: {json.dumps(written, sort_keys=True)}\n"
    with open(live / "plots/metrics/vq/loss.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(row["step"], row["loss"]) for row in rows] == [("0", "3.0"), ("2", "2.0")]
    assert json.loads((live / "metrics.json").read_text())["vq"]["loss"] == 2.0


def test_a_user_error_is_one_line_on_stderr_and_exit_code_1(tmp_path, capsys):
    def failing(run):
        run.log(0, {"loss": 1.0})
        raise FileNotFoundError("no tokens at data/tokens: run the tokenize stage first")

    metrics = tmp_path / "metrics.json"
    code = stage_runtime.run_stage("toy", failing, live=str(tmp_path / "live"), metrics=metrics)
    assert code == 1 and not metrics.exists()
    captured = capsys.readouterr()
    assert captured.err == "toy: error: no tokens at data/tokens: run the tokenize stage first\n"
    assert captured.out == ""
    assert (tmp_path / "live/plots/metrics/loss.tsv").is_file()  # the run was ended


def test_other_errors_keep_their_traceback():
    def broken(run):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        stage_runtime.run_stage("toy", broken)


def test_only_rank_0_logs_and_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    live, metrics = tmp_path / "live", tmp_path / "metrics.json"
    assert stage_runtime.run_stage("toy", training, live=str(live), metrics=str(metrics)) == 0
    assert not live.exists() and not metrics.exists()
    assert capsys.readouterr().out == ""
