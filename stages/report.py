"""DVC stage `report`: the self-contained HTML report (model card, data card, DAG, lineage).

Reads every stage's artifacts under the project root (`--project`, default `.`), the
`dvc.yaml`/`dvc.lock` records and the git state, and writes one HTML file (`--out`) that opens
offline: see `cm3leon.lineage.report`.
"""

import argparse
import sys

from cm3leon.lineage.report import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=4, help="generations listed with sources")
    args = parser.parse_args(argv)
    try:
        summary = build_report(args.project, args.out, args.samples)
    except (ValueError, FileNotFoundError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 1
    print(f"report: wrote {args.out} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
