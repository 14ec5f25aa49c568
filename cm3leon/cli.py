"""The ``cm3leon`` command line.

``cm3leon generate | caption | ask | edit`` run the trained model (:mod:`cm3leon.cli_model`);
``cm3leon run`` and ``cm3leon schedule`` hand over to the Prefect flow in the project's
``flows/pipeline.py`` (the project is the nearest folder upwards holding ``dvc.yaml``), so the
library never imports the orchestration layer (DESIGN.md §2).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from cm3leon.cli_model import add_commands, run_command

MODEL_COMMANDS = ("generate", "caption", "ask", "edit")


def find_project(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` that holds ``dvc.yaml``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "flows" / "pipeline.py").is_file():
            return folder
    raise SystemExit(
        f"cm3leon: no cm3leon project (dvc.yaml + flows/pipeline.py) at or above {here}; "
        "run this inside a clone of the repository"
    )


def _flow(args: list[str]) -> int:
    project = find_project()
    flow_file = str(project / "flows" / "pipeline.py")
    return subprocess.call([sys.executable, flow_file, *args], cwd=project)


def _lineage(args: argparse.Namespace) -> int:
    from cm3leon.lineage.lineage import LineageError, format_lineage, trace

    try:
        record = trace(find_project(), Path(args.path).absolute())
    except LineageError as err:
        raise SystemExit(f"cm3leon lineage: error: {err}") from None
    print(json.dumps(record, indent=2) if args.json else format_lineage(record))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cm3leon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the DVC pipeline through the Prefect flow")
    run.add_argument("--stages", help="comma-separated stages to run, in DAG order (default: all)")
    run.add_argument("--force", action="store_true", help="rerun the stages even if up to date")
    run.add_argument("--openlineage", help="append OpenLineage run events to this JSON-lines file")
    schedule = sub.add_parser("schedule", help="serve the pipeline flow on a cron schedule")
    schedule.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    schedule.add_argument("--name", default="cm3leon-scheduled", help="deployment name")
    add_commands(sub)
    lineage = sub.add_parser("lineage", help="where an artifact or generated sample came from")
    lineage.add_argument("path", help="any output of the pipeline, or an image the CLI wrote")
    lineage.add_argument("--json", action="store_true", help="print the record as JSON")
    args = parser.parse_args(argv)
    if args.command == "lineage":
        return _lineage(args)
    if args.command in MODEL_COMMANDS:
        return run_command(args, find_project())
    if args.command == "run":
        extra = (["--stages", args.stages] if args.stages else []) + (
            ["--force"] if args.force else []
        )
        if args.openlineage:
            extra += ["--openlineage", str(Path(args.openlineage).absolute())]
        return _flow(["run", *extra])
    return _flow(["schedule", "--cron", args.cron, "--name", args.name])


if __name__ == "__main__":
    sys.exit(main())
