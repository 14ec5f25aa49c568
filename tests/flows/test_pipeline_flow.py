"""The Prefect flow drives the real DVC DAG under a test Prefect server."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cm3leon.lineage.lineage import format_lineage, trace
from cm3leon.lineage.registry import add_versions

from conftest import (
    ROOT,
    add_downstream_stage,
    corrupt_corpus,
    dvc,
    project_env,
    task_run_states,
)


def load_flow_module():
    spec = importlib.util.spec_from_file_location("cm3leon_flow", ROOT / "flows" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flow_module(prefect_server):
    return load_flow_module()


ALL_STAGES = [
    "prepare",
    "validate",
    "tokenize",
    "index",
    "pretrain",
    "sft",
    "pretrain_no_retrieval",
    "evaluate",
    "report",
]


def test_stage_order_comes_from_dvc(make_project, flow_module):
    root = make_project()
    add_downstream_stage(root)
    stages = flow_module.dvc_stages(Path(root))
    assert [s["name"] for s in stages] == [*ALL_STAGES, "downstream"]
    assert stages[1]["metrics"] == ["reports/validation/metrics.json"]


def test_flow_runs_stages_and_publishes_metrics(make_project, flow_module, tmp_path):
    # every model passes its gate but the retriever, whose recall@1 cannot reach 2
    gates = {"vq": 0, "retriever": 2.0, "pretrain": 0, "pretrain-no-retrieval": 0, "sft": 0}
    root = make_project({"registry": {"gates": gates}})
    remote = tmp_path / "team-remote"  # a local-folder DVC remote stands for the team's
    dvc("remote", "add", "-d", "team", str(remote), cwd=root)
    git(root, "commit", "-qam", "team remote")
    events_file = root / "openlineage.jsonl"
    state = flow_module.pipeline(
        project=str(root),
        openlineage_file=str(events_file),
        push=True,
        register_models=True,
        return_state=True,
    )
    assert state.is_completed()
    results = state.result()
    check_the_run_is_committed_and_registered(root, results.pop("register"))
    check_a_second_clone_pulls_instead_of_retraining(root, tmp_path / "clone")
    assert list(results) == ALL_STAGES
    metrics = {row["metric"]: row["value"] for row in results["validate"]}
    assert metrics["success"] is True
    assert "dvc.lock" in {p.name for p in root.iterdir()}
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(ALL_STAGES)
    evaluate = {row["metric"]: row["value"] for row in results["evaluate"]}
    assert "best_text_to_image.accuracy" in evaluate  # eval metrics reach the Prefect artifact
    # every stage run is recorded with the flow run that made it and its output hashes
    flow_run_id = str(state.state_details.flow_run_id)
    runs = [json.loads(line) for line in (root / ".lineage/prefect_runs.jsonl").open()]
    assert [r["stage"] for r in runs] == ALL_STAGES
    assert {r["flow_run_id"] for r in runs} == {flow_run_id}
    assert {r["state"] for r in runs} == {"COMPLETED"}
    sft_out = {o["path"]: o["md5"] for o in lock["stages"]["sft"]["outs"]}
    assert runs[ALL_STAGES.index("sft")]["outs"]["models/sft"] == sft_out["models/sft"]
    record = trace(root, "models/sft")
    assert record["artifact"]["prefect_run"]["flow_run_id"] == flow_run_id
    # OpenLineage: START then COMPLETE per stage, with the run's output versions
    events = [json.loads(line) for line in events_file.open()]
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        (stage, kind) for stage in ALL_STAGES for kind in ("START", "COMPLETE")
    ]
    complete = next(e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"] == "sft")
    outputs = {o["name"]: o["facets"]["version"]["datasetVersion"] for o in complete["outputs"]}
    assert outputs["models/sft"] == sft_out["models/sft"]
    assert "models/pretrain" in {i["name"] for i in complete["inputs"]}
    assert all(e["run"]["runId"] for e in events) and all(e["schemaURL"] for e in events)
    # the report is linked as a Prefect artifact (of this flow run: other tests' flows share
    # the session's Prefect server)
    (link,) = [a for a in read_artifacts("report-html") if str(a.flow_run_id) == flow_run_id]
    assert link.type == "markdown" and (root / "reports/index.html").as_uri() in link.data


def git(root: Path, *args: str) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    done = subprocess.run(["git", *identity, *args], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def check_the_run_is_committed_and_registered(root: Path, rows: list[dict]) -> None:
    """The flow's register task committed the run and tagged every model that passed its
    gate with GTO (version and stage); the retriever's gate failed, so it has no tag."""
    actions = {r["name"]: (r["action"], r["version"]) for r in rows}
    assert actions["retriever"] == ("gate failed", None)
    assert actions["sft"] == ("registered", "v0.1.0")
    assert {n for n, (a, _) in actions.items() if a == "registered"} == {
        "vq",
        "pretrain",
        "pretrain-no-retrieval",
        "sft",
    }
    assert git(root, "status", "--porcelain", "--untracked-files=no") == ""  # committed
    assert "dvc.lock" in git(root, "show", "--name-only", "HEAD")
    tags = set(git(root, "tag", "--list").split())
    assert {"sft@v0.1.0", "sft#candidate#1", "vq@v0.1.0"} <= tags
    assert not any(t.startswith("retriever") for t in tags)
    assert git(root, "rev-parse", "sft@v0.1.0^{commit}") == git(root, "rev-parse", "HEAD")
    # cm3leon lineage names the version holding the model's bytes
    record = add_versions(root, trace(root, "models/sft"))
    assert record["registry"]["sft"]["versions"][0]["version"] == "v0.1.0"
    assert "registry: sft@v0.1.0 (candidate)" in format_lineage(record)


def check_a_second_clone_pulls_instead_of_retraining(root: Path, clone: Path) -> None:
    """The run pushed every output: a fresh clone `dvc pull`s them, and `dvc repro` there is
    a no-op with the same hashes."""
    git(root, "add", "-A")
    git(root, "commit", "--allow-empty", "-qm", "pipeline run")
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    assert not (clone / "models" / "sft").exists()
    dvc("pull", cwd=clone)
    assert (clone / "models/sft/model.safetensors").is_file()
    repro = dvc("repro", cwd=clone)
    assert "Running stage" not in repro.stdout and "up to date" in repro.stdout
    assert (clone / "dvc.lock").read_text() == (root / "dvc.lock").read_text()


def read_artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def artifact_hashes(root: Path, stage: str) -> dict[str, str]:
    """dvc.lock hashes of a stage's declared outputs (not its metrics and plots, which hold
    wall times)."""
    declared = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]["outs"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]["outs"]
    return {o["path"]: o["md5"] for o in lock if o["path"] in declared}


def test_data_stages_on_dask_reproduce_the_serial_hashes(make_project, flow_module):
    """tokenize and index rerun through the flow with their shards on a real Dask cluster
    write byte-identical artifacts (dvc.lock hashes) to the serial run's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
    )

    root = make_project()
    dvc("repro", "index", cwd=root)  # serial: no CM3LEON_SHARD_* variables
    serial = {stage: artifact_hashes(root, stage) for stage in ("tokenize", "index")}
    assert [len(hashes) for hashes in serial.values()] == [3, 2]
    state = flow_module.pipeline(
        project=str(root),
        stages=["tokenize", "index"],
        force=True,
        shard_runner="dask",
        shard_workers=2,
        batches_per_shard=1,
        return_state=True,
    )
    assert state.is_completed()
    assert {stage: artifact_hashes(root, stage) for stage in serial} == serial
    record = trace(root, "data/tokens")["artifact"]["prefect_run"]  # lineage names the runner
    assert record["flow_run_id"] == str(state.state_details.flow_run_id)
    assert record["shard_runner"] == "dask"
    assert "shard runner dask" in format_lineage(trace(root, "data/retrieval"))
    # each stage ran as one flow run on Dask, every shard a completed task run of it
    with get_client(sync_client=True) as client:
        for stage in ("tokenize", "index"):
            (run,) = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[f"cm3leon-{stage}"]))
            )
            assert run.name == f"{stage} on dask (2 workers)"
            states = task_run_states(run.id, expected=6)
            assert len(states) >= 6 and set(states) == {"COMPLETED"}


def test_cm3leon_run_hands_its_options_to_the_flow(make_project, prefect_server):
    """`cm3leon run` forwards every option to flows/pipeline.py (whose parser owns them) and
    resolves paths from where it was called."""
    from prefect.settings import get_current_settings

    root = make_project()
    env = {**project_env(), "PREFECT_API_URL": get_current_settings().api.url}

    def cli(*args, cwd=root):
        command = [sys.executable, "-m", "cm3leon.cli", *args]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)

    shown = cli("run", "--help")
    assert shown.returncode == 0 and "--shard-runner {serial,threads,dask,ray}" in shown.stdout
    bad = cli("run", "--shard-runner", "spark")
    assert bad.returncode == 2 and "invalid choice: 'spark'" in bad.stderr
    done = cli(
        "run", "--stages", "prepare,validate", "--openlineage", "events.jsonl", cwd=root / "data"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in (root / "data/events.jsonl").open()]
    assert [e["job"]["name"] for e in events] == ["prepare", "prepare", "validate", "validate"]
    runs = [json.loads(line) for line in (root / ".lineage/prefect_runs.jsonl").open()]
    assert [(r["stage"], r["state"]) for r in runs] == [
        ("prepare", "COMPLETED"),
        ("validate", "COMPLETED"),
    ]


def test_flow_rejects_unknown_stage_names(make_project, flow_module):
    root = make_project()
    state = flow_module.pipeline(project=str(root), stages=["prepair"], return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="unknown stage"):
        state.result()


def test_failing_validate_fails_the_flow_and_stops_the_dag(make_project, flow_module, tmp_path):
    root = make_project()
    add_downstream_stage(root)
    remote = tmp_path / "team-remote"
    dvc("remote", "add", "-d", "team", str(remote), cwd=root)
    dvc("repro", "prepare", cwd=root)
    corrupt_corpus(root)
    events_file = root / "events.jsonl"
    state = flow_module.pipeline(
        project=str(root), openlineage_file=str(events_file), push=True, return_state=True
    )
    assert state.is_failed()
    assert not remote.exists() or not any(remote.rglob("*"))  # a failed run pushes nothing
    kinds = [(e["job"]["name"], e["eventType"]) for e in map(json.loads, events_file.open())]
    assert ("validate", "FAIL") in kinds and ("tokenize", "START") not in kinds
    runs = [json.loads(line) for line in (root / ".lineage/prefect_runs.jsonl").open()]
    assert {"stage": "validate", "state": "FAILED"}.items() <= runs[-1].items()
    with pytest.raises(flow_module.StageFailed) as err:
        state.result()
    assert "stage 'validate' failed" in str(err.value)
    assert "caption" in str(err.value)
    assert not (root / "downstream.txt").exists()


def test_prefect_yaml_deployments_load(flow_module):
    """prefect.yaml passes Prefect's own schema, and every deployment's entrypoint loads the
    pipeline flow with parameters the flow accepts."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)
    assert {d.name for d in model.deployments} == {"nightly", "evaluate-only"}
    for deployment in model.deployments:
        entrypoint = deployment.entrypoint.replace("flows/", f"{ROOT}/flows/", 1)
        loaded = load_flow_from_entrypoint(entrypoint)
        assert loaded.name == flow_module.pipeline.name
        validated = loaded.validate_parameters(deployment.parameters)
        assert deployment.parameters.items() <= validated.items()  # the rest: the defaults
        assert deployment.work_pool.name == "cm3leon-process"
    nightly = next(d for d in model.deployments if d.name == "nightly")
    (schedule,) = nightly.schedules
    assert CronSchedule(cron=schedule.cron, timezone=schedule.timezone).cron == "0 3 * * *"
    step = raw["pull"][0]
    assert "prefect.deployments.steps.set_working_directory" in step
