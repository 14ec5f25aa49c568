"""The model registry: dvc.yaml artifacts, gates from params, GTO versions on real git + DVC."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cm3leon.config import RegistryConfig, load_params
from cm3leon.lineage import registry
from cm3leon.lineage.registry import RegistryError

ROOT = Path(__file__).resolve().parents[2]
IDENTITY = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]

# Two models from one stage; `value` in params.yaml changes their bytes, `score_b` b's gate.
MAKE = """
import json, pathlib, yaml
params = yaml.safe_load(open("params.yaml"))
for name in ("a", "b"):
    folder = pathlib.Path("models") / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.txt").write_text(f"{name} {params['value']}\\n")
json.dump({"a": {"score": 0.9}, "b": {"score": params["score_b"]}}, open("metrics.json", "w"))
"""
DVC_YAML = {
    "stages": {
        "train": {
            "cmd": f"{sys.executable} make.py",
            "deps": ["make.py"],
            "params": ["value", "score_b"],
            "outs": ["models/a", "models/b"],
            "metrics": [{"metrics.json": {"cache": False}}],
        }
    },
    "artifacts": {
        "a": {
            "path": "models/a",
            "type": "model",
            "desc": "model a",
            "labels": ["test"],
            "meta": {"gate": "metrics.json:a.score"},
        },
        "b": {"path": "models/b", "type": "model", "meta": {"gate": "metrics.json:b.score"}},
        "data": {"path": "data.csv", "type": "dataset"},  # not a model: never registered
    },
}
GATES = RegistryConfig(stage="candidate", gates={"a": 0.5, "b": 0.5})


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *IDENTITY, *args], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def dvc(root: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True)


def set_params(root: Path, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text()) if values else {}
    (root / "params.yaml").write_text(yaml.safe_dump({**params, **values}))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A committed git + DVC project whose one stage made models a (gate passes) and b (gate
    fails: score 0.1 < 0.5), run but not committed."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    (root / "make.py").write_text(MAKE)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"value": 1, "score_b": 0.1}))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    dvc(root, "repro")
    return root


def tags(root: Path) -> list[str]:
    return git(root, "tag", "--list").split()


def test_uncommitted_run_is_refused_then_committed_and_registered(project: Path) -> None:
    with pytest.raises(RegistryError, match="commit the run, or pass --commit"):
        registry.register(project, GATES)
    assert tags(project) == []
    planned = registry.register(project, GATES, commit=True, dry_run=True)
    assert [(o.name, o.action) for o in planned] == [("a", "would register"), ("b", "gate failed")]
    assert tags(project) == [] and git(project, "status", "--porcelain", "dvc.lock")  # untouched
    outcomes = registry.register(project, GATES, commit=True)
    assert [(o.name, o.action, o.version) for o in outcomes] == [
        ("a", "registered", "v0.1.0"),
        ("b", "gate failed", None),
    ]
    assert outcomes[1].value == pytest.approx(0.1) and not outcomes[1].passed
    assert sorted(tags(project)) == ["a#candidate#1", "a@v0.1.0"]
    # the run is committed (dvc.lock, the metrics, DVC's .gitignore files) and tagged
    assert git(project, "status", "--porcelain", "--untracked-files=no") == ""
    assert git(project, "rev-parse", "a@v0.1.0^{commit}") == git(project, "rev-parse", "HEAD")
    assert "dvc.lock" in git(project, "show", "--name-only", "HEAD")
    # GTO sees the version and stage; the message carries the gate
    import gto.api

    assert gto.api.show(project)["a"]["stage"] == {"candidate": "v0.1.0"}
    message = git(project, "tag", "-l", "--format=%(contents)", "a@v0.1.0")
    assert "metrics.json:a.score = 0.9 >= 0.5" in message


def test_same_bytes_add_no_version_and_new_bytes_bump_it(project: Path) -> None:
    registry.register(project, GATES, commit=True)
    again = registry.register(project, GATES)  # nothing changed: no commit needed, no tag
    assert [(o.action, o.version) for o in again] == [
        ("unchanged", "v0.1.0"),
        ("gate failed", None),
    ]
    assert len(tags(project)) == 2
    set_params(project, value=2, score_b=0.8)  # new bytes for both; b now passes its gate
    git(project, "commit", "-qam", "value 2")
    dvc(project, "repro")
    outcomes = registry.register(project, GATES, commit=True)
    assert [(o.name, o.action, o.version) for o in outcomes] == [
        ("a", "registered", "v0.2.0"),
        ("b", "registered", "v0.1.0"),
    ]
    versions = registry.model_versions(project)
    assert [v["version"] for v in versions["a"]["versions"]] == ["v0.2.0"]  # v0.1.0: old bytes
    assert versions["b"]["versions"][0]["stages"] == ["candidate"]


def test_a_stale_pipeline_or_uncommitted_code_is_refused(project: Path) -> None:
    registry.register(project, GATES, commit=True)
    (project / "make.py").write_text(MAKE + "\n# edited\n")
    with pytest.raises(RegistryError, match=r"not up to date.*train"):
        registry.register(project, GATES, commit=True)
    dvc(project, "repro")  # up to date again, but the code it ran is not committed
    with pytest.raises(RegistryError, match=r"uncommitted changes to \['make.py'\]"):
        registry.register(project, GATES, commit=True)
    assert len(tags(project)) == 2


def test_gates_must_be_declared_and_readable(project: Path) -> None:
    with pytest.raises(RegistryError, match=r"no minimum for \['b'\]"):
        registry.register(project, RegistryConfig(gates={"a": 0.5}))
    with pytest.raises(RegistryError, match=r"names \['c'\], which dvc.yaml does not declare"):
        registry.register(project, RegistryConfig(gates={"a": 0.5, "b": 0.5, "c": 0.5}))
    with pytest.raises(RegistryError, match=r"metrics\.json has no key 'a\.loss' \(at 'loss'\)"):
        registry.read_metric(project, "metrics.json:a.loss")
    with pytest.raises(RegistryError, match=r"missing\.json not found"):
        registry.read_metric(project, "missing.json:a")
    (project / "text.json").write_text(json.dumps({"a": "high"}))
    with pytest.raises(RegistryError, match="'a' is 'high', not a number"):
        registry.read_metric(project, "text.json:a")
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    del spec["artifacts"]["a"]["meta"]
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(RegistryError, match=r"artifacts\.a\.meta\.gate must name a metric"):
        registry.declared_artifacts(project)


def test_every_model_the_pipeline_declares_has_a_gate_the_run_can_read() -> None:
    """This repository's dvc.yaml and params.yaml: each artifact is a stage output, its gate
    metric is a metrics file of the DAG, and params.yaml sets its minimum."""
    declared = registry.declared_artifacts(ROOT)
    assert {d.name for d in declared} == {
        "vq",
        "retriever",
        "pretrain",
        "pretrain-no-retrieval",
        "sft",
    }
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = {o if isinstance(o, str) else next(iter(o)) for s in stages.values() for o in s["outs"]}
    metrics = {next(iter(m)) for s in stages.values() for m in s.get("metrics", [])}
    gates = load_params(ROOT / "params.yaml").registry.gates
    for item in declared:
        assert item.path in outs, item
        assert item.gate_metric.rpartition(":")[0] in metrics, item
        assert item.name in gates, item
