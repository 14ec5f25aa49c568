"""Prefect flow that runs the DVC pipeline stage by stage (DESIGN.md §11).

The stage list and its order are read from DVC itself (``Repo.index.graph``, the graph behind
``dvc dag``), never kept by hand. Each stage runs as one Prefect task that calls
``dvc repro --single-item <stage>``, so DVC decides whether it is stale (an up-to-date stage is
a no-op) while Prefect adds retries, timeouts, logs and per-stage artifacts (a table of the
stage's DVC metrics). A stage that fails after its retries fails the flow with the stage's own
error output in the exception, and no downstream stage runs.

Every stage run is recorded for lineage in ``.lineage/prefect_runs.jsonl`` (untracked): the
Prefect flow and task run ids, the final state and the hashes ``dvc.lock`` then holds for the
stage's outputs — ``cm3leon lineage`` matches those hashes to name the run that produced an
artifact. With ``--openlineage FILE`` the flow also appends OpenLineage run events (START, then
COMPLETE or FAIL, per stage, inputs and outputs from ``dvc.yaml``/``dvc.lock``) to ``FILE``.

The data stages' shard runner (``--shard-runner serial|threads|dask|ray``, ``--shard-workers``,
``--shard-address``, ``--batches-per-shard``; see ``flows/shards.py``) reaches the stages as
``CM3LEON_SHARD_*`` variables, together with this flow's ``PREFECT_API_URL`` so their shard flow
runs land on the same Prefect server. Unset options fall back to those variables.

After each stage, its DVC metrics become a Prefect table artifact and each HTML file it writes
(``reports/index.html``) a link artifact.

Usage (``cm3leon run`` / ``cm3leon schedule`` call this file with ``--project``)::

    python flows/pipeline.py run [--stages prepare,validate] [--force] [--openlineage FILE]
        [--shard-runner dask --shard-workers 8] [--push] [--register]
    python flows/pipeline.py schedule --cron "0 3 * * *" [--push] [--register]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# No network at run time: Prefect's server telemetry stays off unless the user opts in.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import networkx as nx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.runtime import flow_run, task_run

from cm3leon.config import load_params
from cm3leon.lineage.lineage import RUNS_FILE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for flows/
from flows.shards import ENV_RUNNER, RUNNERS, ShardSettings, shared_api_url

OUTPUT_TAIL_CHARS = 4000
OPENLINEAGE_PRODUCER = "https://github.com/cm3leon/cm3leon/flows/pipeline.py"
OPENLINEAGE_SCHEMA = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the tail of its output."""


def dvc_stages(project: Path) -> list[dict[str, Any]]:
    """Runnable stages in DAG order (upstream first), each with its metrics files.

    Ties are broken by declaration order in ``dvc.yaml``, so the order is deterministic.
    """
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        declared = {_address(s, project): i for i, s in enumerate(repo.index.stages)}
        order = nx.lexicographical_topological_sort(
            graph.reverse(copy=True), key=lambda s: declared.get(_address(s, project), 0)
        )
        return [
            {
                "name": _address(stage, project),
                "metrics": [
                    os.path.relpath(Path(stage.wdir, out.def_path), project)
                    for out in stage.metrics
                ],
            }
            for stage in order
            if stage.cmd  # `.dvc` files of added data have nothing to run
        ]


def _address(stage: Any, project: Path) -> str:
    """The name `dvc repro` takes from the project root: `name`, or `path/dvc.yaml:name`."""
    dvcfile = Path(stage.path).resolve()
    name = getattr(stage, "name", None)
    if not name:  # a `.dvc` file: addressed by its path
        return str(dvcfile.relative_to(project.resolve()))
    if dvcfile == (project / "dvc.yaml").resolve():
        return name
    return f"{dvcfile.relative_to(project.resolve())}:{name}"


def _read_metrics(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        file = Path(path)
        if not file.is_file():
            continue
        data = json.loads(file.read_text(encoding="utf-8")) if file.suffix == ".json" else {}
        for key, value in _flatten(data):
            rows.append({"file": path, "metric": key, "value": value})
    return rows


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        return [kv for k, v in data.items() for kv in _flatten(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), data)]


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line; a single small write, so concurrent readers see whole lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record, sort_keys=True) + "\n")


def _stage_files(project: str, stage: str) -> tuple[list[str], dict[str, str | None]]:
    """``(declared deps, {out path: md5 from dvc.lock})`` of a stage of the root dvc.yaml."""
    import yaml

    root = Path(project)
    declared = yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {}).get(stage, {})
    lock_file = root / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text()).get("stages", {}) if lock_file.is_file() else {}
    outs = {o["path"]: o.get("md5") for o in lock.get(stage, {}).get("outs", [])}
    for out in declared.get("outs", []):  # declared outs the lock does not hold (yet)
        outs.setdefault(next(iter(out)) if isinstance(out, dict) else out, None)
    deps = [d for d in declared.get("deps", []) if isinstance(d, str)]
    return deps, outs


def _openlineage_event(kind: str, stage: str, run_id: str, project: str) -> dict[str, Any]:
    deps, outs = _stage_files(project, stage)

    def dataset(path: str, md5: str | None = None) -> dict[str, Any]:
        facets = {"version": {"datasetVersion": md5}} if md5 else {}
        return {"namespace": f"file://{Path(project).resolve()}", "name": path, "facets": facets}

    return {
        "eventType": kind,
        "eventTime": _now(),
        "producer": OPENLINEAGE_PRODUCER,
        "schemaURL": OPENLINEAGE_SCHEMA,
        "run": {"runId": run_id, "facets": {}},
        "job": {"namespace": "cm3leon", "name": stage, "facets": {}},
        "inputs": [dataset(d) for d in deps],
        "outputs": [dataset(p, m if kind == "COMPLETE" else None) for p, m in outs.items()],
    }


@task(name="dvc-stage", task_run_name="dvc repro {stage}")
def run_stage(
    stage: str,
    metrics: list[str],
    project: str,
    force: bool = False,
    openlineage_file: str | None = None,
    env: dict[str, str] | None = None,
) -> list[dict]:
    """Run one DVC stage; publish its metrics and HTML outputs as Prefect artifacts and record
    the run. ``env`` is added to the stage's environment (the shard runner's variables)."""
    logger = get_run_logger()
    run_id = str(task_run.id or uuid.uuid4())
    if openlineage_file:
        _append_jsonl(Path(openlineage_file), _openlineage_event("START", stage, run_id, project))
    # This interpreter's DVC, and its folder first on PATH so the stages' `python` is this
    # environment's even when it was never activated.
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else [])]
    cmd.append(stage)
    logger.info("running %s", " ".join(cmd))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    proc = subprocess.run(
        cmd,
        cwd=project,
        env={**os.environ, "PATH": path, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        logger.info("%s | %s", stage, line)
    state = "COMPLETED" if proc.returncode == 0 else "FAILED"
    _, outs = _stage_files(project, stage)
    _append_jsonl(
        Path(project) / RUNS_FILE,
        {
            "stage": stage,
            "state": state,
            "finished": _now(),
            "flow_run_id": str(flow_run.id),
            "flow_run_name": flow_run.name,
            "task_run_id": run_id,
            "shard_runner": (env or {}).get(ENV_RUNNER, "serial"),
            "outs": outs,
        },
    )
    if openlineage_file:
        kind = "COMPLETE" if state == "COMPLETED" else "FAIL"
        _append_jsonl(Path(openlineage_file), _openlineage_event(kind, stage, run_id, project))
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-OUTPUT_TAIL_CHARS:]
        raise StageFailed(f"stage '{stage}' failed (exit {proc.returncode}):\n{tail}")
    key = stage.replace("@", "-").replace("_", "-").lower()
    rows = _read_metrics([str(Path(project, m)) for m in metrics])
    if rows:
        create_table_artifact(
            key=f"{key}-metrics",
            table=rows,
            description=f"DVC metrics of stage `{stage}` after this run",
        )
    for path in outs:
        page = Path(project, path)
        if page.suffix == ".html" and page.is_file():
            create_link_artifact(
                key=f"{key}-html",
                link=page.resolve().as_uri(),
                link_text=path,
                description=f"`{path}`, written by stage `{stage}` (opens offline)",
            )
    return rows


@task(name="dvc-push", task_run_name="dvc push")
def push_outputs(project: str) -> str:
    """``dvc push``: every output of this run (and the cache's other versions DVC tracks) to
    the project's default DVC remote, so another clone or worker can ``dvc pull`` them."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "push"]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=project, capture_output=True, text=True, check=False)
    output = (proc.stdout + proc.stderr).strip()
    for line in output.splitlines():
        logger.info("push | %s", line)
    if proc.returncode != 0:
        raise StageFailed(
            f"dvc push failed (exit {proc.returncode}); is a default remote configured "
            f"(dvc remote add -d <name> <url>)?\n{output[-OUTPUT_TAIL_CHARS:]}"
        )
    return output


@task(name="gto-register", task_run_name="cm3leon register")
def register_task(project: str, stage: str | None) -> list[dict[str, Any]]:
    """Commit the run's git-tracked outputs (``dvc.lock``, metrics, plots, report) and give
    every model of ``dvc.yaml``'s ``artifacts:`` that passes its gate (params ``registry``) a
    GTO version and stage (:mod:`cm3leon.lineage.registry`); a table artifact lists each
    model's gate and outcome. The tags are local: ``git push --follow-tags`` shares them."""
    from cm3leon.lineage import registry

    logger = get_run_logger()
    config = load_params(Path(project) / "params.yaml").registry
    if stage:
        config = dataclasses.replace(config, stage=stage)
    outcomes = registry.register(project, config, commit=True)
    for line in registry.format_outcomes(outcomes).splitlines():
        logger.info("register | %s", line)
    rows = registry.outcomes_json(outcomes)
    create_table_artifact(
        key="model-registry",
        table=rows,
        description="Models of dvc.yaml artifacts: gate metric, minimum and GTO version",
    )
    return rows


@flow(name="cm3leon-pipeline", log_prints=True)
def pipeline(
    project: str = ".",
    stages: list[str] | None = None,
    force: bool = False,
    openlineage_file: str | None = None,
    shard_runner: str | None = None,
    shard_workers: int | None = None,
    shard_address: str | None = None,
    batches_per_shard: int | None = None,
    push: bool = False,
    register_models: bool = False,
    register_stage: str | None = None,
) -> dict[str, list[dict]]:
    """Run the DVC DAG (or the named stages, in DAG order) with per-stage retries.

    The ``shard_*`` options pick where the data stages encode/embed their shards
    (``flows/shards.py``); an unset one keeps its ``CM3LEON_SHARD_*`` variable or default.
    ``push``: after every stage succeeded, ``dvc push`` the outputs to the default remote
    (a failed stage stops the flow first, so a failed run pushes nothing).
    ``register_models``: then commit the run and register a GTO version of each model that
    passes its gate (:func:`register_task`; ``register_stage`` overrides params
    ``registry.stage``).
    """
    root = Path(project).resolve()
    settings = load_params(root / "params.yaml").flow
    given = {
        "runner": shard_runner,
        "workers": shard_workers,
        "address": shard_address,
        "batches_per_shard": batches_per_shard,
    }
    shards = dataclasses.replace(
        ShardSettings.from_env(), **{k: v for k, v in given.items() if v is not None}
    )
    env = shards.environ()
    api_url = shared_api_url()
    if api_url:  # the stages' shard flows report to this flow's server
        env["PREFECT_API_URL"] = api_url
    dag = dvc_stages(root)
    known = [s["name"] for s in dag]
    if stages:
        unknown = sorted(set(stages) - set(known))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages in dvc.yaml: {known}")
        dag = [s for s in dag if s["name"] in stages]
    stage_task = run_stage.with_options(
        retries=settings.retries,
        retry_delay_seconds=settings.retry_delay_seconds,
        timeout_seconds=settings.stage_timeout_seconds,
    )
    results = {}
    for stage in dag:
        results[stage["name"]] = stage_task(
            stage["name"], stage["metrics"], str(root), force, openlineage_file, env
        )
    if push:
        push_outputs(str(root))
    if register_models:
        results["register"] = register_task(str(root), register_stage)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cm3leon", description="Run or schedule the cm3leon DVC pipeline"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline once")
    run.add_argument("--stages", help="comma-separated stage names (default: all)")
    run.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    run.add_argument("--openlineage", help="append OpenLineage run events to this JSON-lines file")
    run.add_argument(
        "--shard-runner",
        choices=RUNNERS,
        help="where tokenize/index encode their shards (default: $CM3LEON_SHARD_RUNNER or serial)",
    )
    run.add_argument("--shard-workers", type=int, help="workers of a local cluster / pool")
    run.add_argument("--shard-address", help="an existing Dask scheduler or Ray cluster")
    run.add_argument("--batches-per-shard", type=int, help="shard size in batches (default 4)")
    schedule = sub.add_parser("schedule", help="serve the flow on a cron schedule")
    for command in (run, schedule):
        command.add_argument(
            "--register",
            action="store_true",
            help="after a successful run (and push): commit it and give each model that passes "
            "its gate (params registry) a GTO version and stage",
        )
        command.add_argument("--register-stage", help="GTO stage (default: registry.stage)")
    for command in (run, schedule):
        command.add_argument(
            "--push",
            action="store_true",
            help="dvc push every output to the default DVC remote after a successful run",
        )
    schedule.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    schedule.add_argument("--name", default="cm3leon-scheduled", help="deployment name")
    for command in (run, schedule):
        command.add_argument("--project", default=".", help="the project root (default: cwd)")
    args = parser.parse_args(argv)
    project = str(Path(args.project).resolve())
    if args.command == "run":
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        state = pipeline(
            project=project,
            stages=stages,
            force=args.force,
            openlineage_file=str(Path(args.openlineage).resolve()) if args.openlineage else None,
            shard_runner=args.shard_runner,
            shard_workers=args.shard_workers,
            shard_address=args.shard_address,
            batches_per_shard=args.batches_per_shard,
            push=args.push,
            register_models=args.register,
            register_stage=args.register_stage,
            return_state=True,
        )
        return 0 if state.is_completed() else 1
    parameters = {"project": project, "push": args.push, "register_models": args.register}
    if args.register_stage:
        parameters["register_stage"] = args.register_stage
    pipeline.serve(name=args.name, cron=args.cron, parameters=parameters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
