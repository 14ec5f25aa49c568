"""Prefect flow that runs the DVC pipeline stage by stage (DESIGN.md §11).

The stage list and its order are read from DVC itself (``Repo.index.graph``, the graph behind
``dvc dag``), never kept by hand. Each stage runs as one Prefect task that calls
``dvc repro --single-item <stage>``, so DVC decides whether it is stale (an up-to-date stage is
a no-op) while Prefect adds retries, timeouts, logs and per-stage artifacts (a table of the
stage's DVC metrics). A stage that fails after its retries fails the flow with the stage's own
error output in the exception, and no downstream stage runs.

Usage (from the project root; ``cm3leon run`` / ``cm3leon schedule`` call this file)::

    python flows/pipeline.py run [--stages prepare,validate] [--force]
    python flows/pipeline.py schedule --cron "0 3 * * *"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# No network at run time: Prefect's server telemetry stays off unless the user opts in.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import networkx as nx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from cm3leon.config import load_params

OUTPUT_TAIL_CHARS = 4000


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


@task(name="dvc-stage", task_run_name="dvc repro {stage}")
def run_stage(stage: str, metrics: list[str], project: str, force: bool = False) -> list[dict]:
    """Run one DVC stage; publish its metrics as a Prefect table artifact."""
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=project, capture_output=True, text=True, check=False)
    for line in (proc.stdout + proc.stderr).splitlines():
        logger.info("%s | %s", stage, line)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-OUTPUT_TAIL_CHARS:]
        raise StageFailed(f"stage '{stage}' failed (exit {proc.returncode}):\n{tail}")
    rows = _read_metrics([str(Path(project, m)) for m in metrics])
    if rows:
        create_table_artifact(
            key=f"{stage.replace('@', '-').replace('_', '-').lower()}-metrics",
            table=rows,
            description=f"DVC metrics of stage `{stage}` after this run",
        )
    return rows


@flow(name="cm3leon-pipeline", log_prints=True)
def pipeline(
    project: str = ".", stages: list[str] | None = None, force: bool = False
) -> dict[str, list[dict]]:
    """Run the DVC DAG (or the named stages, in DAG order) with per-stage retries."""
    root = Path(project).resolve()
    settings = load_params(root / "params.yaml").flow
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
        results[stage["name"]] = stage_task(stage["name"], stage["metrics"], str(root), force)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run or schedule the cm3leon DVC pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline once")
    run.add_argument("--stages", help="comma-separated stage names (default: all)")
    run.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    schedule = sub.add_parser("schedule", help="serve the flow on a cron schedule")
    schedule.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    schedule.add_argument("--name", default="cm3leon-scheduled")
    args = parser.parse_args(argv)
    project = os.getcwd()
    if args.command == "run":
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        state = pipeline(project=project, stages=stages, force=args.force, return_state=True)
        return 0 if state.is_completed() else 1
    pipeline.serve(name=args.name, cron=args.cron, parameters={"project": project})
    return 0


if __name__ == "__main__":
    sys.exit(main())
