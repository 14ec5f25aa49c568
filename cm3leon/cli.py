"""The ``cm3leon`` command line.

``cm3leon generate | caption | ask | edit`` run the trained model (:mod:`cm3leon.cli_model`);
``cm3leon run`` and ``cm3leon schedule`` hand over to the Prefect flow in the project's
``flows/pipeline.py`` (the project is the nearest folder upwards holding ``dvc.yaml``), so the
library never imports the orchestration layer (DESIGN.md §2). ``cm3leon lineage`` traces an
artifact (:mod:`cm3leon.lineage.lineage`); ``cm3leon verify`` reruns the first stages in a clone
and compares their hashes with the committed ``dvc.lock`` (:mod:`cm3leon.lineage.verify`);
``cm3leon register`` gives the models that pass their gates a GTO version and stage
(:mod:`cm3leon.lineage.registry`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from cm3leon.cli_model import add_commands, run_command

FLOW_COMMANDS = {
    "run": "run the DVC pipeline through the Prefect flow (see `cm3leon run --help`)",
    "schedule": "serve the pipeline flow on a cron schedule (see `cm3leon schedule --help`)",
}


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


def _flow(command: str, args: list[str]) -> int:
    """``flows/pipeline.py <command> --project <root> <args>``: its parser owns the options."""
    project = find_project()
    flow_file = str(project / "flows" / "pipeline.py")
    return subprocess.call([sys.executable, flow_file, command, "--project", str(project), *args])


def _lineage(args: argparse.Namespace) -> int:
    from cm3leon.lineage import lineage as lin
    from cm3leon.lineage.registry import add_versions

    kind = "json" if args.json else args.format
    if args.path == "diff":  # cm3leon lineage diff A [B]
        if not 1 <= len(args.revs) <= 2:
            raise SystemExit("cm3leon lineage: error: diff takes one or two revisions (A [B])")
        try:
            diff = lin.lineage_diff(find_project(), *args.revs)
        except lin.LineageError as err:
            raise SystemExit(f"cm3leon lineage: error: {err}") from None
        print(json.dumps(diff, indent=2) if kind == "json" else lin.format_diff(diff))
        return 0
    if args.revs:
        raise SystemExit(f"cm3leon lineage: error: unexpected arguments {args.revs}")
    try:
        project = find_project()
        record = add_versions(project, lin.trace(project, Path(args.path).absolute()))
    except lin.LineageError as err:
        raise SystemExit(f"cm3leon lineage: error: {err}") from None
    if kind == "json":
        print(json.dumps(record, indent=2))
    elif kind == "dot":
        print(lin.to_dot(record))
    elif kind == "mermaid":
        print(lin.to_mermaid(record))
    else:
        print(lin.format_lineage(record, all_params=args.all_params))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cm3leon.lineage import verify as ver
    from cm3leon.lineage.lineage import LineageError

    try:
        result = ver.verify(
            find_project(), args.through, args.rev, args.workdir, args.keep, args.tolerance
        )
    except LineageError as err:
        raise SystemExit(f"cm3leon verify: error: {err}") from None
    print(json.dumps(result, indent=2) if args.json else ver.format_verify(result))
    return 0 if result["reproduced"] else 1


def _register(args: argparse.Namespace) -> int:
    import dataclasses

    from cm3leon.config import ConfigError, load_params
    from cm3leon.lineage import registry as reg

    project = find_project()
    try:
        config = load_params(project / "params.yaml").registry
        if args.stage:
            config = dataclasses.replace(config, stage=args.stage)
        outcomes = reg.register(project, config, commit=args.commit, dry_run=args.dry_run)
    except (ConfigError, reg.RegistryError) as err:
        raise SystemExit(f"cm3leon register: error: {err}") from None
    if args.json:
        print(json.dumps(reg.outcomes_json(outcomes), indent=2))
    else:
        print(reg.format_outcomes(outcomes))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cm3leon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # `run` and `schedule` forward their options to flows/pipeline.py, whose parser (and --help)
    # owns them: --stages, --force, --openlineage, --shard-runner, ...; --cron, --name.
    for name, text in FLOW_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    add_commands(sub)
    lineage = sub.add_parser("lineage", help="where an artifact or generated sample came from")
    lineage.add_argument(
        "path",
        help="any output of the pipeline, or an image the CLI wrote; or `diff A [B]`: what "
        "differs between the runs at git revisions / dvc exp names A and B (default: workspace)",
    )
    lineage.add_argument("revs", nargs="*", help=argparse.SUPPRESS)
    lineage.add_argument(
        "--format",
        choices=("text", "json", "dot", "mermaid"),
        default="text",
        help="text (default): each upstream stage once; json: the whole record; dot/mermaid: "
        "the stage graph",
    )
    lineage.add_argument("--json", action="store_true", help="same as --format json")
    lineage.add_argument(
        "--all-params", action="store_true", help="text: every param, not only changed ones"
    )
    register = sub.add_parser(
        "register",
        help="GTO versions of the dvc.yaml artifacts whose gate metric passes (params registry)",
    )
    register.add_argument(
        "--commit",
        action="store_true",
        help="commit the run's git-tracked outputs (dvc.lock, metrics, plots, report) first "
        "when they differ from HEAD; without it such a workspace is refused",
    )
    register.add_argument("--stage", help="GTO stage to assign (default: params registry.stage)")
    register.add_argument(
        "--dry-run", action="store_true", help="say what would be registered; tag nothing"
    )
    register.add_argument("--json", action="store_true", help="each model's outcome as JSON")
    verify = sub.add_parser(
        "verify",
        help="rerun the first stages in a clone and compare their hashes with dvc.lock",
    )
    verify.add_argument(
        "--through",
        default="tokenize",
        help="last stage to rerun, with every stage upstream (default tokenize: the data and "
        "tokenizer stages, ~5 min on 2 cores; evaluate: the whole run)",
    )
    verify.add_argument("--rev", default="HEAD", help="git revision whose dvc.lock to check")
    verify.add_argument("--workdir", help="folder for the clone (default: a temporary one)")
    verify.add_argument("--keep", action="store_true", help="keep the clone afterwards")
    verify.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="relative tolerance on the metrics, for a machine whose bytes cannot agree (a GPU, "
        "ARM, base.numerics.mode: fast): the metrics decide instead of the hashes (default 0: "
        "every byte)",
    )
    verify.add_argument("--json", action="store_true", help="the whole result as JSON")
    args, rest = parser.parse_known_args(argv)
    if args.command in FLOW_COMMANDS:
        return _flow(args.command, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "lineage":
        return _lineage(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "register":
        return _register(args)
    return run_command(args, find_project())


if __name__ == "__main__":
    sys.exit(main())
