"""Where did this file come from? Lineage from ``dvc.lock``, git and per-sample provenance.

DESIGN.md §11. ``dvc.lock`` records, for every stage run, its command, the params it read with
their values, and the hash of every dependency and output. :func:`trace` joins those records
into a graph for any artifact path: the stage whose output holds the path, then every stage
upstream of it **once** (breadth-first, nearest first), each with its command, params (and
which of them differ from the defaults in ``cm3leon.config``), code with hashes, and inputs
that name the stage that produced them (``None`` for source data no stage produces); a stage
shared by several paths (``prepare`` under every model) is a node once, referenced by name.
Each stage names the Prefect flow run that produced its output (with its state and the data
stages' shard runner)
when the flow's record (``.lineage/prefect_runs.jsonl``) holds the output hash that
``dvc.lock`` holds; identical bytes made by several runs name the latest. The record adds
the git commit (and whether the working tree was dirty), the versions of the packages that
shape results, and, for a generated sample, the memory-bank documents retrieved for it: from
the ``manifest.json`` beside an evaluate-stage image, or from the ``<output>.json`` sidecar the
CLI writes (whose model folder is then traced too).

This module reads files (``dvc.lock`` is YAML) and asks ``git``; it never imports DVC.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cm3leon.config import Params

PACKAGES = ("cm3leon", "torch", "deepspeed", "faiss-cpu", "tokenizers", "dvc", "prefect")
CODE_PREFIXES = ("cm3leon/", "stages/", "flows/")
RUNS_FILE = Path(".lineage") / "prefect_runs.jsonl"  # flows/pipeline.py appends, we read


class LineageError(ValueError):
    """The path is not an artifact of this project (or dvc.lock is missing)."""


def read_lock(project: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(project) / "dvc.lock"
    if not path.is_file():
        raise LineageError(f"{path} not found: run the pipeline (dvc repro) first")
    return yaml.safe_load(path.read_text(encoding="utf-8")).get("stages", {})


def find_producer(lock: dict[str, dict], path: str) -> tuple[str, dict] | None:
    """``(stage, out entry)`` whose output is ``path`` or a folder holding it."""
    for stage, record in lock.items():
        for out in record.get("outs", []):
            if path == out["path"] or path.startswith(out["path"].rstrip("/") + "/"):
                return stage, out
    return None


def trace(project: str | Path, path: str | Path) -> dict[str, Any]:
    """The lineage record of ``path`` (relative to ``project`` or absolute inside it).
    :func:`cm3leon.lineage.registry.add_versions` adds the registered versions of its models
    (git tags of the moment, so the report, whose bytes follow from the artifacts alone,
    leaves them out)."""
    project = Path(project).resolve()
    file = Path(path) if Path(path).is_absolute() else project / path
    lock = read_lock(project)
    sample = _sample_provenance(project, file.resolve())
    if sample is not None and sample.get("model_folder"):
        relative, target = str(file), sample["model_folder"]  # a CLI output may live anywhere
    else:
        relative = target = _relative(project, file)
    stages = _graph(lock, target, prefect_runs(project), project)
    if not stages:
        raise LineageError(
            f"{relative} is not an output of any stage in dvc.lock (outputs: "
            f"{sorted(o['path'] for r in lock.values() for o in r.get('outs', []))})"
        )
    record = {
        "path": relative,
        "artifact": next(iter(stages.values())),
        "stages": stages,
        "git": git_state(project),
        "packages": package_versions(),
    }
    if sample is not None:
        record["sample"] = sample
    return record


def prefect_runs(project: Path) -> list[dict[str, Any]]:
    """The flow's run records (``.lineage/prefect_runs.jsonl``), oldest first."""
    path = project / RUNS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _producing_run(runs: list[dict], stage: str, output: str, md5: str | None) -> dict | None:
    """The latest completed Prefect run of ``stage`` that left exactly this output hash."""
    if md5 is None:
        return None
    keep = ("flow_run_id", "flow_run_name", "task_run_id", "state", "finished", "shard_runner")
    for run in reversed(runs):
        done = run["stage"] == stage and run["state"] == "COMPLETED"
        if done and run.get("outs", {}).get(output) == md5:
            return {k: run.get(k) for k in keep}
    return None


def _graph(
    lock: dict, path: str, runs: list[dict], project: Path | None = None
) -> dict[str, dict[str, Any]]:
    """Every stage ``path`` depends on, once: ``{stage: node}``, its producer first, then
    breadth-first upstream. Each input names the stage that produced it (``stage``)."""
    stages: dict[str, dict[str, Any]] = {}
    queue = [path]
    while queue:
        wanted = queue.pop(0)
        found = find_producer(lock, wanted)
        if found is None:
            continue
        stage, out = found
        if stage in stages:
            if out["path"] not in [o["path"] for o in stages[stage]["outputs"]]:
                stages[stage]["outputs"].append({"path": out["path"], "md5": out.get("md5")})
            continue
        record = lock[stage]
        params = _flatten_params(record.get("params", {}))
        node: dict[str, Any] = {
            "stage": stage,
            "path": wanted,
            "output": out["path"],
            "output_md5": out.get("md5"),
            "outputs": [{"path": out["path"], "md5": out.get("md5")}],
            "cmd": record.get("cmd"),
            "params": params,
            "params_changed": _changed_from_defaults(params),
            "prefect_run": _producing_run(runs, stage, out["path"], out.get("md5")),
            "code": [],
            "inputs": [],
        }
        environment = _recorded_environment(project, out["path"])
        if environment is not None:
            node["environment"] = environment
        for dep in record.get("deps", []):
            entry = {"path": dep["path"], "md5": dep.get("md5")}
            if dep["path"].startswith(CODE_PREFIXES):
                node["code"].append(entry)
                continue
            producer = find_producer(lock, dep["path"])
            entry["stage"] = producer[0] if producer is not None else None
            node["inputs"].append(entry)
            if producer is not None:
                queue.append(dep["path"])
        stages[stage] = node
    return stages


def _recorded_environment(project: Path | None, output: str) -> dict[str, Any] | None:
    """The numeric environment a trained model folder records (``config.json``)."""
    config = None if project is None else project / output / "config.json"
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("environment")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def _changed_from_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """The params whose value differs from the default of ``cm3leon.config.Params`` (a key with
    no default, e.g. a user section, counts as changed)."""
    defaults = _flatten_params({"defaults": asdict(Params())})
    return {k: v for k, v in params.items() if k not in defaults or _norm(defaults[k]) != _norm(v)}


def _norm(value: Any) -> Any:
    """Tuples (dataclass defaults) and lists (YAML) compare equal."""
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def _flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """``{file: {key: value}}`` -> ``{"key.sub": value}`` (file names dropped: one params file)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    for values in params.values():
        walk("", values)
    return flat


def _sample_provenance(project: Path, file: Path) -> dict[str, Any] | None:
    sidecar = file.with_name(file.name + ".json")
    if sidecar.is_file():  # written by `cm3leon generate|edit`
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        data["model_folder"] = _relative(project, data["model"])
        data["source"] = str(sidecar)
        return data
    manifest = file.parent / "manifest.json"
    if manifest.is_file():  # the evaluate stage's generations
        for entry in json.loads(manifest.read_text(encoding="utf-8")):
            if entry.get("file") == file.name:
                return {**entry, "source": _relative(project, manifest)}
    return None


def _relative(project: Path, path: str | Path) -> str:
    path = Path(path)
    absolute = path if path.is_absolute() else (project / path)
    try:
        return absolute.resolve().relative_to(project).as_posix()
    except ValueError:
        raise LineageError(f"{path} is outside the project {project}") from None


def git_state(project: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=project, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def format_lineage(
    record: dict[str, Any], all_params: bool = False, run_context: bool = True
) -> str:
    """The ``cm3leon lineage`` text: the sample's provenance, then each upstream stage once
    with the params that differ from the defaults (``all_params``: every param it reads).
    ``run_context`` False leaves out what describes the moment of asking rather than the
    artifacts — the git commit and dirty flag, the Prefect runs found — as the report does."""
    lines = [f"{record['path']}"]
    sample = record.get("sample")
    if sample is not None:
        lines.append(f"  generated sample (from {sample['source']}):")
        for key in ("prompt", "input", "task", "model", "strategies", "seed", "correct"):
            if key in sample:
                lines.append(f"    {key}: {sample[key]}")
        retrieved = sample.get("retrieved") or []
        lines.append(f"    retrieved memory-bank documents: {len(retrieved)}")
        for doc in retrieved:
            lines.append(f"      {doc['id']}  score {doc['score']:.4f}  {doc['caption']}")
    git = record["git"]
    if run_context:
        lines.append(f"  git commit {git['commit']}{' (dirty)' if git['dirty'] else ''}")
    lines.append("  packages: " + ", ".join(f"{k} {v}" for k, v in record["packages"].items()))
    stages = record["stages"]
    lines.append(
        f"  {len(stages)} stages, each once (an input names the stage that made it; "
        "--json has every hash):"
    )
    registry = record.get("registry", {}) if run_context else {}
    for node in stages.values():
        _format_node(node, lines, all_params, run_context, registry)
    return "\n".join(lines)


def format_stage(node: dict[str, Any], all_params: bool = False, run_context: bool = True) -> str:
    """One stage of a lineage record as :func:`format_lineage` prints it."""
    lines: list[str] = []
    _format_node(node, lines, all_params, run_context)
    return "\n".join(lines)


def _registry_line(name: str, entry: dict[str, Any]) -> str:
    """``registry: sft@v0.2.0 (candidate)``: the GTO versions holding these bytes."""
    if not entry["versions"]:
        return f"    registry: {name}, no registered version holds these bytes (cm3leon register)"
    shown = ", ".join(
        f"{name}@{v['version']}" + (f" ({', '.join(v['stages'])})" if v["stages"] else "")
        for v in entry["versions"]
    )
    return f"    registry: {shown}"


def _format_node(
    node: dict[str, Any],
    lines: list[str],
    all_params: bool,
    run_context: bool = True,
    registry: dict[str, dict[str, Any]] | None = None,
) -> None:
    outputs = ", ".join(f"{o['path']} [{o['md5']}]" for o in node["outputs"])
    lines.append(f"  stage '{node['stage']}' -> {outputs}")
    for name, entry in (registry or {}).items():
        if entry["path"] in [o["path"] for o in node["outputs"]]:
            lines.append(_registry_line(name, entry))
    lines.append(f"    cmd: {node['cmd']}")
    run = node.get("prefect_run") if run_context else None
    if run:
        lines.append(
            f"    prefect flow run {run['flow_run_id']} ({run['flow_run_name']}), "
            f"task run {run['task_run_id']}: {run['state']} at {run['finished']}"
            + (f", shard runner {run['shard_runner']}" if run.get("shard_runner") else "")
        )
    elif run_context:
        lines.append("    prefect: no flow run left this output (run with plain dvc repro)")
    env = node.get("environment")
    if env:
        lines.append(
            f"    trained on {env.get('cpu')} ({env.get('cpu_capability')}), torch "
            f"{env.get('torch')}, {env.get('blas')}, {env.get('threads')} threads x "
            f"{env.get('processes')} processes, {env.get('device')} {env.get('precision')}"
            + (f", {env['gpu']}" if env.get("gpu") else "")
            + f", numerics {(env.get('numerics') or {}).get('mode', 'not recorded')}"
        )
    shown = node["params"] if all_params else node["params_changed"]
    what = "params" if all_params else "params differing from the defaults"
    lines.append(f"    {what} ({len(shown)} of {len(node['params'])}):")
    lines.extend(f"      {key} = {json.dumps(value)}" for key, value in shown.items())
    digest = hashlib.sha256("".join(sorted(str(c["md5"]) for c in node["code"])).encode())
    lines.append(f"    code: {len(node['code'])} files, digest {digest.hexdigest()[:12]}")
    for entry in node["inputs"]:
        source = f"stage '{entry['stage']}'" if entry["stage"] else "source data"
        lines.append(f"    input {entry['path']} [{entry['md5']}] <- {source}")


def to_dot(record: dict[str, Any]) -> str:
    """The lineage graph in Graphviz DOT: a node per stage (name, output hashes), an edge per
    data input labelled with its path."""
    out = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
    for name, node in record["stages"].items():
        label = "\\n".join([name, *(f"{o['path']} {str(o['md5'])[:8]}" for o in node["outputs"])])
        out.append(f'  "{name}" [label="{label}"];')
    for name, node in record["stages"].items():
        for entry in node["inputs"]:
            if entry["stage"]:
                out.append(f'  "{entry["stage"]}" -> "{name}" [label="{entry["path"]}"];')
    out.append("}")
    return "\n".join(out)


def to_mermaid(record: dict[str, Any]) -> str:
    """The lineage graph as a Mermaid flowchart (renders in GitHub Markdown)."""
    out = ["flowchart LR"]
    for name, node in record["stages"].items():
        hashes = "<br/>".join(f"{o['path']} {str(o['md5'])[:8]}" for o in node["outputs"])
        out.append(f'  {name}["{name}<br/>{hashes}"]')
    for name, node in record["stages"].items():
        for entry in node["inputs"]:
            if entry["stage"]:
                out.append(f"  {entry['stage']} -->|{entry['path']}| {name}")
    return "\n".join(out)


# --- what differs between two runs ----------------------------------------------------------


def resolve_revision(project: Path, rev: str) -> str:
    """A git revision or a ``dvc exp`` name (``refs/exps/.../<name>``) -> its commit sha."""
    done = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    if done.returncode == 0:
        return done.stdout.strip()
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
        cwd=project,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    found = [line.split()[0] for line in refs if line.endswith(f"/{rev}")]
    if len(found) != 1:
        raise LineageError(
            f"{rev!r} is neither a git revision nor a dvc experiment name "
            f"({len(found)} experiments match)"
        )
    return found[0]


def lock_at(project: Path, rev: str | None) -> dict[str, dict[str, Any]]:
    """The stages of ``dvc.lock`` at git commit ``rev`` (None: the workspace's)."""
    if rev is None:
        return read_lock(project)
    done = subprocess.run(
        ["git", "show", f"{rev}:dvc.lock"], cwd=project, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise LineageError(f"revision {rev} has no dvc.lock: {done.stderr.strip()}")
    return yaml.safe_load(done.stdout).get("stages", {})


def lineage_diff(project: str | Path, a: str, b: str | None = None) -> dict[str, Any]:
    """What differs between the runs recorded at revisions ``a`` and ``b`` (git revisions or
    ``dvc exp`` names; ``b`` None: the workspace): the params (with the stages that read
    them), the stages whose recorded run differs and why (params, code, data inputs,
    outputs), and the metrics, from ``dvc metrics diff``."""
    project = Path(project).resolve()
    rev_a = resolve_revision(project, a)
    rev_b = None if b is None else resolve_revision(project, b)
    lock_a, lock_b = lock_at(project, rev_a), lock_at(project, rev_b)
    params: dict[str, dict[str, Any]] = {}
    stages: dict[str, dict[str, list[str]]] = {}
    for stage in sorted(set(lock_a) | set(lock_b), key=_stage_order(lock_a, lock_b)):
        old, new = lock_a.get(stage, {}), lock_b.get(stage, {})
        if not old or not new:
            stages[stage] = {"only_in": ["a" if old else "b"]}
            continue
        p_old = _flatten_params(old.get("params", {}))
        p_new = _flatten_params(new.get("params", {}))
        changed_params = sorted(k for k in set(p_old) | set(p_new) if p_old.get(k) != p_new.get(k))
        for key in changed_params:
            entry = params.setdefault(key, {"a": p_old.get(key), "b": p_new.get(key), "stages": []})
            entry["stages"].append(stage)
        deps_old = {d["path"]: d.get("md5") for d in old.get("deps", [])}
        deps_new = {d["path"]: d.get("md5") for d in new.get("deps", [])}
        changed_deps = sorted(
            p for p in set(deps_old) | set(deps_new) if deps_old.get(p) != deps_new.get(p)
        )
        outs_old = {o["path"]: o.get("md5") for o in old.get("outs", [])}
        outs_new = {o["path"]: o.get("md5") for o in new.get("outs", [])}
        why = {
            "params": changed_params,
            "code": [p for p in changed_deps if p.startswith(CODE_PREFIXES)],
            "inputs": [p for p in changed_deps if not p.startswith(CODE_PREFIXES)],
            "outputs": sorted(
                p for p in set(outs_old) | set(outs_new) if outs_old.get(p) != outs_new.get(p)
            ),
            "cmd": ["changed"] if old.get("cmd") != new.get("cmd") else [],
        }
        if any(why.values()):
            stages[stage] = {k: v for k, v in why.items() if v}
    return {
        "a": {"rev": a, "commit": rev_a},
        "b": {"rev": b or "workspace", "commit": rev_b},
        "params": params,
        "stages": stages,
        "metrics": _metrics_diff(project, rev_a, rev_b),
    }


def _stage_order(*locks: dict[str, Any]):
    order = {name: i for lock in reversed(locks) for i, name in enumerate(lock)}
    return lambda name: order.get(name, len(order))


def _metrics_diff(project: Path, a: str, b: str | None) -> dict[str, Any]:
    """``dvc metrics diff --json`` between the two revisions (``{}`` when DVC is absent)."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    done = subprocess.run(
        [dvc, "metrics", "diff", a, *([b] if b else []), "--json"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not done.stdout.strip():
        return {}
    return changed_metrics(json.loads(done.stdout))


def changed_metrics(diff: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """``dvc metrics diff --json`` less the metrics that are NaN on both sides: DVC lists a NaN
    (a loss with no tokens to score) as changed on every diff, since NaN != NaN."""
    changed = {}
    for file, metrics in diff.items():
        kept = {
            key: value
            for key, value in metrics.items()
            if not (_is_nan(value.get("old")) and _is_nan(value.get("new")))
        }
        if kept:
            changed[file] = kept
    return changed


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


METRICS_SHOWN = 30  # text output; --format json has every changed metric


def _short_commit(commit: str | None) -> str:
    return commit[:10] if commit else "workspace"


def format_diff(diff: dict[str, Any]) -> str:
    """The ``cm3leon lineage diff`` text."""
    a, b = diff["a"], diff["b"]
    lines = [
        f"lineage diff {a['rev']} ({_short_commit(a['commit'])}) .. "
        f"{b['rev']} ({_short_commit(b['commit'])})"
    ]
    lines.append(f"params that differ ({len(diff['params'])}):")
    for key, entry in diff["params"].items():
        lines.append(
            f"  {key}: {json.dumps(entry['a'])} -> {json.dumps(entry['b'])}"
            f"  (read by {', '.join(entry['stages'])})"
        )
    lines.append(f"stages whose run differs ({len(diff['stages'])}): {', '.join(diff['stages'])}")
    for stage, why in diff["stages"].items():
        parts = [f"{kind} {', '.join(items)}" for kind, items in why.items()]
        lines.append(f"  {stage}: " + "; ".join(parts))
    changed = sorted(
        (file, key, change)
        for file, values in diff["metrics"].items()
        for key, change in values.items()
        if change.get("old") != change.get("new")
    )
    lines.append(f"metrics that differ ({len(changed)}, from dvc metrics diff):")
    for file, key, change in changed[:METRICS_SHOWN]:
        lines.append(f"  {file}: {key} {change.get('old')} -> {change.get('new')}")
    if len(changed) > METRICS_SHOWN:
        lines.append(f"  ... {len(changed) - METRICS_SHOWN} more (--format json lists all)")
    return "\n".join(lines)
