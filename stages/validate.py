"""DVC stage `validate`: the great_expectations gate on the corpus.

Reads the corpus folder (`--corpus`) and params `data` and `validate`; writes results JSON,
HTML Data Docs, a readable summary and metrics under `--out`. Exits non-zero when any
expectation fails, printing each failure with sample offending values, so nothing downstream
runs on bad data.
"""

import argparse
import sys
from pathlib import Path

from cm3leon.config import ConfigError, load_params
from cm3leon.data.corpus import CorpusError
from cm3leon.data.validation import validate_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--corpus", required=True, help="corpus folder written by prepare")
    parser.add_argument("--out", required=True, help="report folder")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        report = validate_corpus(args.corpus, params.data, params.validate, Path(args.out))
    except (ConfigError, CorpusError) as err:
        print(f"validate: error: {err}", file=sys.stderr)
        return 1
    metrics = report.metrics
    print(
        f"validate: {metrics['expectations_evaluated'] - metrics['expectations_failed']}/"
        f"{metrics['expectations_evaluated']} expectations passed; report in {args.out}"
    )
    if not report.success:
        print(f"validate: FAILED\n{report.format_failures()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
