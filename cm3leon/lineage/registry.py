"""A model registry in DVC's own terms: ``artifacts:`` in ``dvc.yaml``, versions and stages by GTO.

``dvc.yaml`` declares each model the pipeline makes under ``artifacts:`` (its path, ``type:
model``, a description, labels) and, in ``meta.gate``, the metric that must pass before a
version is registered (``FILE:key``, a dotted key into that JSON file; the file's path lives in
dvc.yaml like every path). ``params.yaml``'s ``registry`` section holds each gate's minimum and
the stage a new version is assigned (:class:`cm3leon.config.RegistryConfig`).

:func:`register` is what ``cm3leon register`` and the flow's ``register`` option run after a
successful pipeline. It refuses a workspace whose pipeline is not up to date (``dvc status``)
or whose run is not committed: a GTO version is a git tag on a commit, and that commit's
``dvc.lock`` is what names the model's bytes (``commit=True`` commits the run's git-tracked
outputs itself: ``dvc.lock`` and the ``cache: false`` metrics, plots and report, nothing else).
Then, per declared model:

- ``gate failed``: its metric is below the minimum; nothing is tagged;
- ``unchanged``: the model's hash in ``dvc.lock`` equals the one at its latest registered
  version, so a rerun that reproduced the same bytes adds no version;
- ``registered``: GTO tags the commit ``<name>@vX.Y.0`` (the first is ``v0.1.0``, each next a
  minor bump) and assigns ``registry.stage`` (tag ``<name>#<stage>#N``).

``gto show`` lists the registry; ``dvc artifacts get . <name> --stage candidate`` (or
``--rev <name>@v0.1.0``) fetches a version's files from the DVC remote. :func:`model_versions`
answers, for ``cm3leon lineage``, which registered versions hold the workspace's bytes of a
model. Like the rest of :mod:`cm3leon.lineage`, this module runs DVC and git as commands; GTO
through its Python API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from cm3leon.config import RegistryConfig
from cm3leon.lineage.lineage import LineageError, find_producer, lock_at, read_lock

FIRST_VERSION = "v0.1.0"
# Who tags when git has no identity configured (a fresh CI worker); git's own settings win.
FALLBACK_AUTHOR = ("cm3leon", "cm3leon@localhost")


class RegistryError(LineageError):
    """The registry cannot act: a declaration, a gate or the workspace is not as it must be."""


@dataclass(frozen=True)
class Declared:
    """One model of ``dvc.yaml``'s ``artifacts:``."""

    name: str
    path: str
    desc: str
    labels: tuple[str, ...]
    gate_metric: str  # FILE:dotted.key


@dataclass(frozen=True)
class Outcome:
    """What :func:`register` did with one declared model."""

    name: str
    path: str
    md5: str | None
    metric: str
    value: float
    minimum: float
    action: str  # registered | would register | unchanged | gate failed
    version: str | None  # the new version, or the registered one it equals
    stage: str | None

    @property
    def passed(self) -> bool:
        return self.value >= self.minimum


def declared_artifacts(project: str | Path) -> list[Declared]:
    """The ``artifacts:`` of ``dvc.yaml`` whose type is ``model``, each with its gate metric."""
    path = Path(project) / "dvc.yaml"
    if not path.is_file():
        raise RegistryError(f"{path} not found")
    artifacts = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("artifacts") or {}
    models = []
    for name, spec in artifacts.items():
        if spec.get("type") != "model":
            continue
        gate = (spec.get("meta") or {}).get("gate")
        if not isinstance(gate, str) or ":" not in gate:
            raise RegistryError(
                f"{path}: artifacts.{name}.meta.gate must name a metric as FILE:key, got {gate!r}"
            )
        models.append(
            Declared(name, spec["path"], spec.get("desc", ""), tuple(spec.get("labels", [])), gate)
        )
    if not models:
        raise RegistryError(f"{path} declares no artifact of type model under artifacts:")
    return models


def read_metric(project: str | Path, metric: str) -> float:
    """The number at ``FILE:dotted.key`` (``reports/eval_metrics.json:sft.text_to_image.x``)."""
    file, _, key = metric.rpartition(":")
    path = Path(project) / file
    if not path.is_file():
        raise RegistryError(f"gate metric {metric}: {path} not found (run the pipeline first)")
    value: Any = json.loads(path.read_text(encoding="utf-8"))
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RegistryError(f"gate metric {metric}: {path} has no key {key!r} (at {part!r})")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RegistryError(f"gate metric {metric}: {key!r} is {value!r}, not a number")
    return float(value)


def register(
    project: str | Path,
    config: RegistryConfig,
    *,
    commit: bool = False,
    dry_run: bool = False,
) -> list[Outcome]:
    """Register a GTO version of every declared model that passes its gate and changed since its
    latest version (module docstring). ``commit``: commit the run's git-tracked outputs first
    when they differ from HEAD; ``dry_run``: decide, tag nothing, commit nothing."""
    project = Path(project)
    declared = declared_artifacts(project)
    missing = [d.name for d in declared if d.name not in config.gates]
    if missing:
        raise RegistryError(
            f"params.yaml registry.gates has no minimum for {missing} (declared in dvc.yaml "
            "artifacts:); every registered model needs a gate"
        )
    unknown = sorted(set(config.gates) - {d.name for d in declared})
    if unknown:
        raise RegistryError(
            f"params.yaml registry.gates names {unknown}, which dvc.yaml does not declare as "
            f"models under artifacts: (declared: {[d.name for d in declared]})"
        )
    _require_up_to_date(project)
    _require_committed(project, commit=commit, dry_run=dry_run)
    lock = read_lock(project)  # HEAD's, once committed
    import gto.api  # GTO comes with DVC; imported here so lineage commands do not pay for it

    author = _author(project)
    outcomes = []
    for item in declared:
        value, minimum = read_metric(project, item.gate_metric), config.gates[item.name]
        md5 = _md5(lock, item.path)
        if md5 is None:
            raise RegistryError(
                f"dvc.yaml artifacts.{item.name}: {item.path} is not a stage output in the "
                "committed dvc.lock"
            )
        latest = _latest_version(project, item.name)
        decided = dict(name=item.name, path=item.path, md5=md5, metric=item.gate_metric)
        decided.update(value=value, minimum=minimum, version=None, stage=None)
        if value < minimum:
            outcomes.append(Outcome(**decided, action="gate failed"))
            continue
        if latest is not None and _md5(lock_at(project, latest[1]), item.path) == md5:
            outcomes.append(Outcome(**decided | {"version": latest[0]}, action="unchanged"))
            continue
        decided.update(version=_next_version(latest[0] if latest else None), stage=config.stage)
        if dry_run:
            outcomes.append(Outcome(**decided, action="would register"))
            continue
        version = decided["version"]
        message = (
            f"{item.name} {version}: {item.gate_metric} = {value:.4g} >= {minimum:g}; "
            f"{item.path} md5 {md5}"
        )
        gto.api.register(project, item.name, "HEAD", version=version, message=message, **author)
        gto.api.assign(project, item.name, config.stage, version=version, message=message, **author)
        outcomes.append(Outcome(**decided, action="registered"))
    return outcomes


def model_versions(project: str | Path) -> dict[str, dict[str, Any]]:
    """Per declared model, the registered versions whose ``dvc.lock`` names the same bytes as
    the workspace's (``{"path", "md5", "versions": [{"version", "stages", "commit"}]}``); a
    model without any is listed with no versions. Empty when the project is not a git repo
    or declares no models."""
    project = Path(project)
    try:
        declared, lock = declared_artifacts(project), read_lock(project)
    except LineageError:
        return {}
    if subprocess.run(["git", "rev-parse"], cwd=project, capture_output=True).returncode:
        return {}  # not a git repository: no tags, no versions
    result = {}
    for item in declared:
        md5 = _md5(lock, item.path)
        versions = []
        for entry in _versions(project, item.name):
            try:
                same = _md5(lock_at(project, entry["commit_hexsha"]), item.path) == md5
            except LineageError:
                same = False
            if same and md5 is not None:
                versions.append(
                    {
                        "version": entry["version"],
                        "stages": sorted(s["stage"] for s in entry.get("stages", [])),
                        "commit": entry["commit_hexsha"],
                    }
                )
        result[item.name] = {"path": item.path, "md5": md5, "versions": versions}
    return result


def add_versions(project: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """A lineage record (:func:`cm3leon.lineage.lineage.trace`) with ``registry``: per model
    among its stages' outputs, the registered versions holding the same bytes
    (:func:`model_versions`), which :func:`~cm3leon.lineage.lineage.format_lineage` prints
    under the stage that made it."""
    outputs = {o["path"] for node in record["stages"].values() for o in node["outputs"]}
    versions = model_versions(project)
    return {**record, "registry": {n: e for n, e in versions.items() if e["path"] in outputs}}


def format_outcomes(outcomes: list[Outcome]) -> str:
    """One line per model: name, gate (metric, value, minimum) and what happened."""
    lines = []
    for o in outcomes:
        gate = f"{o.metric} = {o.value:.4g} ({'>=' if o.passed else '<'} {o.minimum:g})"
        what = {
            "registered": f"registered {o.name}@{o.version}, stage {o.stage}",
            "would register": f"would register {o.name}@{o.version}, stage {o.stage}",
            "unchanged": f"unchanged: same bytes as {o.name}@{o.version}",
            "gate failed": "not registered: gate failed",
        }[o.action]
        lines.append(f"{o.name:<22} {what}  [{gate}]")
    return "\n".join(lines)


def outcomes_json(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    return [asdict(o) | {"passed": o.passed} for o in outcomes]


# --- the workspace -----------------------------------------------------------------------------
def _require_up_to_date(project: Path) -> None:
    """``dvc status`` must report nothing: the registered bytes are the ones dvc.lock names."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    done = subprocess.run([dvc, "status", "--json"], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise RegistryError(f"dvc status failed in {project}: {done.stderr.strip()}")
    changed = json.loads(done.stdout or "{}")
    if changed:
        raise RegistryError(
            f"the pipeline is not up to date (dvc status: {', '.join(sorted(changed))}): run "
            "dvc repro first, so that dvc.lock names the models' bytes"
        )


def run_outputs(project: Path) -> list[str]:
    """``dvc.lock`` and the outputs dvc.yaml keeps out of the DVC cache (``cache: false``):
    what git tracks of a run."""
    stages = (yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8")) or {}).get(
        "stages", {}
    )
    paths = ["dvc.lock"]
    for record in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in record.get(kind, []):
                if isinstance(entry, dict):
                    (path, options), *_ = entry.items()
                    if (options or {}).get("cache") is False:
                        paths.append(path)
    return paths


def _require_committed(project: Path, *, commit: bool, dry_run: bool = False) -> None:
    """HEAD must hold the run: no tracked file differs from it and no output of the run that
    git should track is new. With ``commit``, the run's git-tracked outputs
    (:func:`run_outputs`, and the ``.gitignore`` files DVC writes beside its outputs) are
    committed (``dry_run``: checked, not committed); a change to anything else is an error:
    the run would be tagged with code or params it did not use."""
    outputs = run_outputs(project)

    def is_output(file: str) -> bool:
        if Path(file).name == ".gitignore":
            return True
        return any(file == p or file.startswith(p.rstrip("/") + "/") for p in outputs)

    changed = [
        line[3:].strip()
        for line in _run_git(
            project, "status", "--porcelain", "--untracked-files=no"
        ).stdout.splitlines()
        if line.strip()
    ]
    new = _run_git(
        project,
        "ls-files",
        "--others",
        "--exclude-standard",
        "--",
        *outputs,
        ":(glob)**/.gitignore",
    ).stdout.split()
    changed = sorted(set(changed) | set(new))
    if not changed:
        return
    other = [f for f in changed if not is_output(f)]
    if other or not commit:
        raise RegistryError(
            "a version tags a commit, and HEAD does not hold this run: "
            + (
                f"uncommitted changes to {other[:5]} (commit them, then run again)"
                if other
                else f"{changed[:5]} differ from HEAD (commit the run, or pass --commit)"
            )
        )
    if dry_run:
        return
    name, email = _author(project).values()
    _run_git(project, "add", "--", *changed)
    _run_git(
        project,
        "-c",
        f"user.name={name}",
        "-c",
        f"user.email={email}",
        "commit",
        "--quiet",
        "-m",
        "Pipeline run: dvc.lock and its git-tracked outputs (cm3leon register)",
    )


def _run_git(project: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise RegistryError(f"git {' '.join(args[:2])} failed in {project}: {done.stderr.strip()}")
    return done


def _author(project: Path) -> dict[str, str]:
    """Git's configured identity, else :data:`FALLBACK_AUTHOR` (environment first, as git)."""

    def config(key: str, env: str, fallback: str) -> str:
        if os.environ.get(env):
            return os.environ[env]
        done = subprocess.run(["git", "config", key], cwd=project, capture_output=True, text=True)
        return done.stdout.strip() or fallback

    return {
        "author": config("user.name", "GIT_AUTHOR_NAME", FALLBACK_AUTHOR[0]),
        "author_email": config("user.email", "GIT_AUTHOR_EMAIL", FALLBACK_AUTHOR[1]),
    }


# --- dvc.lock and GTO --------------------------------------------------------------------------
def _md5(lock: dict[str, dict], path: str) -> str | None:
    found = find_producer(lock, path)
    return None if found is None or found[1]["path"] != path else found[1].get("md5")


def _versions(project: Path, name: str) -> list[dict[str, Any]]:
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        return gto.api.show(project, name)
    except ArtifactNotFound:
        return []


def _latest_version(project: Path, name: str) -> tuple[str, str] | None:
    """``(version, commit)`` of the model's latest registered version, None before the first."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        latest = gto.api.find_latest_version(project, name)
    except ArtifactNotFound:
        return None
    return None if latest is None else (latest.version, latest.commit_hexsha)


def _next_version(latest: str | None) -> str:
    if latest is None:
        return FIRST_VERSION
    major, minor, _patch = (int(p) for p in latest.lstrip("v").split(".")[:3])
    return f"v{major}.{minor + 1}.0"
