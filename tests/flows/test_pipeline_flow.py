"""The Prefect flow drives the real DVC DAG under a test Prefect server."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from conftest import ROOT, add_downstream_stage, corrupt_corpus, dvc


def load_flow_module():
    spec = importlib.util.spec_from_file_location("cm3leon_flow", ROOT / "flows" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flow_module():
    with prefect_test_harness(server_startup_timeout=120):
        yield load_flow_module()


ALL_STAGES = [
    "prepare",
    "validate",
    "tokenize",
    "index",
    "pretrain",
    "sft",
    "pretrain_no_retrieval",
    "evaluate",
]


def test_stage_order_comes_from_dvc(make_project, flow_module):
    root = make_project()
    add_downstream_stage(root)
    stages = flow_module.dvc_stages(Path(root))
    assert [s["name"] for s in stages] == [
        "prepare",
        "validate",
        "tokenize",
        "index",
        "pretrain",
        "sft",
        "pretrain_no_retrieval",
        "evaluate",
        "downstream",
    ]
    assert stages[1]["metrics"] == ["reports/validation/metrics.json"]


def test_flow_runs_stages_and_publishes_metrics(make_project, flow_module):
    root = make_project()
    state = flow_module.pipeline(project=str(root), return_state=True)
    assert state.is_completed()
    results = state.result()
    assert list(results) == ALL_STAGES
    metrics = {row["metric"]: row["value"] for row in results["validate"]}
    assert metrics["success"] is True
    assert "dvc.lock" in {p.name for p in root.iterdir()}
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(ALL_STAGES)
    evaluate = {row["metric"]: row["value"] for row in results["evaluate"]}
    assert "best_text_to_image.accuracy" in evaluate  # eval metrics reach the Prefect artifact


def test_flow_rejects_unknown_stage_names(make_project, flow_module):
    root = make_project()
    state = flow_module.pipeline(project=str(root), stages=["prepair"], return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="unknown stage"):
        state.result()


def test_failing_validate_fails_the_flow_and_stops_the_dag(make_project, flow_module):
    root = make_project()
    add_downstream_stage(root)
    dvc("repro", "prepare", cwd=root)
    corrupt_corpus(root)
    state = flow_module.pipeline(project=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(flow_module.StageFailed) as err:
        state.result()
    assert "stage 'validate' failed" in str(err.value)
    assert "caption" in str(err.value)
    assert not (root / "downstream.txt").exists()
