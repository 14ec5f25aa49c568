"""DVC stage `prepare`: build the corpus (ShapeWorld or the user's data) as sharded Parquet.

Reads params `base.seed`, `data` and the caption bounds of `validate` (rows outside them are
invalid here, not a failed gate later); writes the corpus folder given by `--out`
(documents, task tables, quarantine table, manifest.json). Exits non-zero, naming every invalid
row, when user data has problems and `data.on_invalid` is `fail`.
"""

import argparse
import logging
import sys

from stage_runtime import StageRun, run_stage

from cm3leon.config import load_params
from cm3leon.data.prepare import prepare_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="corpus folder to write")
    parser.add_argument(
        "--raw",
        default="data/raw",
        help="the folder dvc.yaml tracks as this stage's input: user data must be inside it",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def work(run: StageRun) -> None:
        params = load_params(args.params)
        bounds = (params.validate.caption_min_chars, params.validate.caption_max_chars)
        manifest = prepare_corpus(params.data, params.base.seed, args.out, bounds, args.raw)
        print(
            f"prepare: wrote {manifest['num_documents']} documents to {args.out} "
            f"(splits {manifest['splits']}, tasks {manifest['tasks']}, "
            f"quarantined {manifest['quarantined']})"
        )

    # OSError, not only FileNotFoundError: the user's images may be unreadable for other reasons.
    return run_stage("prepare", work, errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
