"""DVC stage `report`: the self-contained HTML report (model card, data card, DAG, lineage).

Reads the artifacts the DAG produced — the corpus (`--corpus`), the validation report
(`--validation`), the evaluation folder (`--eval`), the model folders (`--models`, comma
separated) and their training summaries (`--training`, in the same order), paths relative
to the project root (`--project`, default `.`) — the params
(`--params`), the `dvc.yaml`/`dvc.lock` records and the git state, and writes one HTML file
(`--out`) that opens offline: see `cm3leon.lineage.report`.
"""

import argparse
import sys

from stage_runtime import StageRun, run_stage

from cm3leon.config import load_params
from cm3leon.lineage.report import ReportInputs, build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".")
    parser.add_argument("--params", default="params.yaml")
    for name in ("corpus", "validation", "eval", "models", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument(
        "--training",
        default="",
        help="each model's training summary (dvclive's metrics.json), comma separated, in the "
        "order of --models: the steps and tokens the run did",
    )
    parser.add_argument("--samples", type=int, default=4, help="generations listed with sources")
    args = parser.parse_args(argv)

    def work(run: StageRun) -> None:
        inputs = ReportInputs.from_arguments(vars(args))
        params = load_params(args.params)
        summary = build_report(args.project, inputs, params, args.out, args.samples)
        print(f"report: wrote {args.out} ({summary})")

    return run_stage("report", work)


if __name__ == "__main__":
    sys.exit(main())
