"""The great_expectations gate on a corpus folder (the ``validate`` stage).

:func:`validate_corpus` streams the document shards into a pandas frame of metadata plus
per-image statistics (byte length, expected byte length, pixel range, recomputed SHA-256; no
pixel bytes are kept), derives frames for split proportions, cross-split image leakage and each
task table, and checks every frame with its own great_expectations 1.x suite, run through a
checkpoint that renders Data Docs. Into ``report_dir`` it writes, each atomically:

* ``results.json``  the GE validation result of every suite, keyed by suite name, without
  GE's per-run ids and clock times (equal data gives equal bytes; Data Docs keep them);
* ``metrics.json``  flat numbers for ``dvc metrics show``;
* ``summary.md``    one readable line per failed expectation, with sample offending values;
* ``data_docs/``    the GE Data Docs HTML site (``data_docs/index.html``).

GE runs in an ephemeral (in-memory) context: no ``gx/`` folder is created, analytics and
progress bars are off, and nothing touches the network.
"""

from __future__ import annotations

import copy
import hashlib
import html
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cm3leon.artifacts import atomic_dir, atomic_write_json, atomic_write_text, folder_digest
from cm3leon.config import DataConfig, ValidateConfig
from cm3leon.data.corpus import (
    DOCUMENT_SCHEMA,
    SPLITS,
    CorpusError,
    iter_documents,
    read_quarantine,
    read_task_table,
)
from cm3leon.tasks import TABLE_TASKS, table_spec

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.expectations import Expectation

STAT_COLUMNS = ("image_bytes", "expected_bytes", "pixel_min", "pixel_max", "sha256_recomputed")
DOCUMENT_COLUMNS = (
    *(n for n in DOCUMENT_SCHEMA.names if n != "image"),
    *STAT_COLUMNS,
    "hash_matches",
)
# GE 1.24 cannot name pandas 3's default "str" dtype, so Arrow strings become StringDtype().
STRING_TYPES = ["StringDtype"]
INT_TYPES = ["int32", "int64"]
DOCS_SITE = "corpus_report"


@dataclass(frozen=True)
class Failure:
    """One failed expectation: which suite, which expectation, on which column, and why."""

    suite: str
    expectation: str
    column: str | None
    details: str


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_corpus`."""

    success: bool
    failures: list[Failure] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def format_failures(self) -> str:
        """Readable summary: one line per failed expectation."""
        if not self.failures:
            return "All expectations passed.\n"
        lines = [
            f"- {f.suite}: {f.expectation} on {f.column or '(table)'}: {f.details}"
            for f in self.failures
        ]
        return "\n".join([f"{len(self.failures)} expectation(s) failed:", "", *lines]) + "\n"


def documents_frame(corpus_dir: str | Path) -> pd.DataFrame:
    """One row per document: every stored column but ``image``, plus per-image statistics."""
    parts = [_batch_frame(batch) for batch in iter_documents(corpus_dir)]
    if not parts:
        parts = [_batch_frame(pa.RecordBatch.from_pylist([], schema=DOCUMENT_SCHEMA))]
    return pd.concat(parts, ignore_index=True)


def _batch_frame(batch: pa.RecordBatch) -> pd.DataFrame:
    images = batch.column("image")
    stats = [_image_stats(images[i]) for i in range(batch.num_rows)]
    nbytes, low, high, digests = (list(c) for c in zip(*stats, strict=True)) if stats else [[]] * 4
    frame = batch.drop_columns(["image"]).to_pandas(types_mapper=_string_dtype)
    frame["image_bytes"] = pd.array(nbytes, dtype="Int64")
    height, width, channels = (frame[c].astype("Int64") for c in ("height", "width", "channels"))
    frame["expected_bytes"] = height * width * channels
    frame["pixel_min"] = pd.array(low, dtype="Int64")
    frame["pixel_max"] = pd.array(high, dtype="Int64")
    frame["sha256_recomputed"] = pd.array(digests, dtype=pd.StringDtype())
    frame["hash_matches"] = (frame["sha256_recomputed"] == frame["image_sha256"]).fillna(False)
    return frame


def _string_dtype(arrow_type: pa.DataType) -> pd.api.extensions.ExtensionDtype | None:
    return pd.StringDtype() if pa.types.is_string(arrow_type) else None


def _image_stats(value: pa.Scalar) -> tuple[int | None, int | None, int | None, str | None]:
    """(byte length, pixel min, pixel max, sha256) of one raw image, without copying it."""
    if not value.is_valid:
        return None, None, None, None
    buffer = value.as_buffer()
    pixels = np.frombuffer(buffer, dtype=np.uint8)
    digest = hashlib.sha256(buffer).hexdigest()
    if pixels.size == 0:
        return 0, None, None, digest
    return pixels.size, int(pixels.min()), int(pixels.max()), digest


def split_frame(docs: pd.DataFrame, expected: dict[str, float]) -> pd.DataFrame:
    """One row per split: its fraction of unique images against the configured fraction.

    Counts are whole images, so a split of N images can miss its fraction by up to 1/N by
    rounding alone (9 images at 0.8/0.1/0.1 give 7/1/1: train 0.022 off). ``deviation`` is the
    raw difference; ``excess_deviation`` — what ``validate.split_tolerance`` bounds — is the part
    beyond that one image of rounding."""
    hashes = docs.dropna(subset=["image_sha256"]).groupby("split")["image_sha256"].nunique()
    frame = pd.DataFrame({"split": SPLITS, "images": [int(hashes.get(s, 0)) for s in SPLITS]})
    total = max(int(frame["images"].sum()), 1)
    frame["fraction"] = frame["images"] / total
    frame["expected"] = [expected[s] for s in SPLITS]
    frame["deviation"] = (frame["fraction"] - frame["expected"]).abs().round(9)
    frame["excess_deviation"] = (frame["deviation"] - 1.0 / total).clip(lower=0.0).round(9)
    return frame


def leakage_frame(docs: pd.DataFrame) -> pd.DataFrame:
    """Distinct (image_sha256, split) pairs: a hash appearing twice is in two splits."""
    pairs = docs[["image_sha256", "split"]].dropna().drop_duplicates()
    return pairs.sort_values(["image_sha256", "split"]).reset_index(drop=True)


def task_frame(
    corpus_dir: str | Path, name: str, doc_ids: pd.Series, image_size: int
) -> pd.DataFrame:
    """A task table without its binary columns, plus byte lengths and the matched document id."""
    table = read_task_table(corpus_dir, name)
    binary = table_spec(name).image
    frame = table.drop_columns([binary.column] if binary else []).to_pandas()
    if binary:
        column, channels = binary.column, binary.channels
        lengths = pc.binary_length(table.column(column)).to_pylist()
        frame[f"{column}_bytes"] = pd.array(lengths, dtype="Int64")
        frame[f"{column}_expected_bytes"] = image_size * image_size * channels
    known = pd.DataFrame({"document_id": pd.Series(doc_ids.dropna().unique(), dtype="str")})
    return frame.merge(known, how="left", left_on="image_id", right_on="document_id")


def _gx() -> Any:
    """Import great_expectations lazily (slow import) with analytics off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    return gx


def document_expectations(data_config: DataConfig, config: ValidateConfig) -> list[Expectation]:
    e = _gx().expectations
    size = data_config.image_size
    strings = ("id", "split", "caption", "image_sha256", "sha256_recomputed")
    return [
        e.ExpectTableColumnsToMatchSet(column_set=list(DOCUMENT_COLUMNS), exact_match=True),
        *[e.ExpectColumnValuesToBeInTypeList(column=c, type_list=STRING_TYPES) for c in strings],
        *[
            e.ExpectColumnValuesToBeInTypeList(column=c, type_list=INT_TYPES)
            for c in ("height", "width", "channels")
        ],
        *[
            e.ExpectColumnValuesToNotBeNull(column=c)
            for c in ("id", "split", "caption", "image_sha256", *STAT_COLUMNS)
        ],
        e.ExpectColumnValueLengthsToBeBetween(
            column="caption", min_value=config.caption_min_chars, max_value=config.caption_max_chars
        ),
        e.ExpectColumnValuesToBeUnique(column="id"),
        e.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        e.ExpectColumnValuesToBeInSet(column="height", value_set=[size]),
        e.ExpectColumnValuesToBeInSet(column="width", value_set=[size]),
        e.ExpectColumnValuesToBeInSet(column="channels", value_set=[3]),
        _pair_equal("image_bytes", "expected_bytes"),
        e.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        e.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
        _pair_equal("image_sha256", "sha256_recomputed"),
    ]


def _pair_equal(column_a: str, column_b: str) -> Expectation:
    """Equality of two columns; rows with a null are skipped (a not-null check reports them,
    and GE cannot compare pandas NA)."""
    return _gx().expectations.ExpectColumnPairValuesToBeEqual(
        column_A=column_a, column_B=column_b, ignore_row_if="either_value_is_missing"
    )


def split_expectations(config: ValidateConfig) -> list[Expectation]:
    between = _gx().expectations.ExpectColumnValuesToBeBetween
    return [between(column="excess_deviation", min_value=0.0, max_value=config.split_tolerance)]


def leakage_expectations() -> list[Expectation]:
    return [_gx().expectations.ExpectColumnValuesToBeUnique(column="image_sha256")]


def task_expectations(name: str) -> list[Expectation]:
    e = _gx().expectations
    spec = table_spec(name)
    expectations = [e.ExpectColumnValuesToNotBeNull(column=c) for c in ("image_id", *spec.texts)]
    # Unlike _pair_equal, a missing document_id (unknown image) counts as unexpected.
    expectations.append(
        e.ExpectColumnPairValuesToBeEqual(column_A="image_id", column_B="document_id")
    )
    if spec.image is not None:
        column = spec.image.column
        expectations.append(e.ExpectColumnValuesToNotBeNull(column=f"{column}_bytes"))
        expectations.append(_pair_equal(f"{column}_bytes", f"{column}_expected_bytes"))
    return expectations


def _context(docs_dir: Path) -> AbstractDataContext:
    """An in-memory GE context whose only Data Docs site is written under ``docs_dir``."""
    gx = _gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    backend = {
        "class_name": "TupleFilesystemStoreBackend",
        "base_directory": str(docs_dir.resolve()),
    }
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": backend,
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    project = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={DOCS_SITE: site},
    )
    return gx.get_context(project_config=project, mode="ephemeral")


def _run_suite(
    context: AbstractDataContext,
    name: str,
    frame: pd.DataFrame,
    expectations: list[Expectation],
    sample: int,
) -> ExpectationSuiteValidationResult:
    """Validate ``frame`` with a new suite ``name`` via a checkpoint that updates Data Docs."""
    gx = _gx()
    batch = (
        context.data_sources.get("corpus")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("whole")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    for i, each in enumerate(suite.expectations):  # GE draws uuid4 ids; equal suites, equal ids
        each.id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"cm3leon/validate/{name}/{i}"))
    suite.save()
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=name,
            validation_definitions=[definition],
            actions=[],  # Data Docs are built afterwards, from escaped copies (_html_safe)
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": sample},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=_run_id())
    for key, value in result.run_results.items():
        context.validation_results_store.set(key, _html_safe(value))
    return next(iter(result.run_results.values()))


def _html_safe(result: ExpectationSuiteValidationResult) -> ExpectationSuiteValidationResult:
    """A copy of ``result`` whose values from the data (offending values, observed values,
    error messages) are HTML-escaped: great_expectations writes them into the Data Docs pages
    as they are, so a caption holding ``<img onerror=...>`` would be live markup there. The
    returned result (summary, metrics) keeps the raw values."""
    safe = copy.deepcopy(result)
    for each in safe.results:
        each.result = _escaped(each.result)
        if isinstance(each.exception_info, dict):
            each.exception_info = _escaped(each.exception_info)
    return safe


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_escaped(v) for v in value)
    return value


def _failures(suite: str, result: ExpectationSuiteValidationResult, sample: int) -> list[Failure]:
    failures = []
    for each in result.results:
        if each.success:
            continue
        kwargs = each.expectation_config.kwargs
        column = kwargs.get("column") or ",".join(
            str(kwargs[k]) for k in ("column_A", "column_B") if k in kwargs
        )
        failures.append(
            Failure(suite, each.expectation_config.type, column or None, _details(each, sample))
        )
    return failures


def _details(each: Any, sample: int) -> str:
    """Sample offending values, the observed value, or the error of one failed expectation."""
    info = each.exception_info if isinstance(each.exception_info, dict) else {}
    errors = [info, *(v for v in info.values() if isinstance(v, dict))]  # flat or per metric
    for error in errors:
        if error.get("raised_exception"):
            return f"error: {error.get('exception_message')}"
    result = each.result or {}
    if result.get("unexpected_count"):
        values = [_plain(v) for v in list(result.get("partial_unexpected_list") or [])[:sample]]
        count, total = result["unexpected_count"], result.get("element_count")
        return f"{count} of {total} unexpected, e.g. {values}"
    if "observed_value" in result:
        extra = f" ({result['details']})" if result.get("details") else ""
        return f"observed {result['observed_value']!r}{extra}"
    return f"failed: {result}" if result else "failed without a result (metric error)"


def _plain(value: Any) -> Any:
    """numpy scalars (also inside tuples) as plain Python values, for readable output."""
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


def _metrics(
    results: dict[str, ExpectationSuiteValidationResult],
    docs: pd.DataFrame,
    tasks: dict[str, pd.DataFrame],
) -> dict[str, Any]:
    evaluated = sum(r.statistics["evaluated_expectations"] for r in results.values())
    failed = sum(r.statistics["unsuccessful_expectations"] for r in results.values())
    percent = round(100.0 * (evaluated - failed) / evaluated, 2) if evaluated else 100.0
    return {
        "success": all(r.success for r in results.values()),
        "expectations_evaluated": evaluated,
        "expectations_failed": failed,
        "success_percent": percent,
        "documents": len(docs),
        **{f"documents_{s}": int((docs["split"] == s).sum()) for s in SPLITS},
        **{f"task_{name}_rows": len(frame) for name, frame in tasks.items()},
    }


def check_validated(corpus_dir: str | Path, metrics_path: str | Path) -> None:
    """Refuse a corpus the gate did not pass: ``metrics_path`` (validate's ``metrics.json``)
    must say success **for these bytes** — its ``corpus_digest`` must be the corpus folder's
    digest now, so a corpus rewritten after validation (by hand, or a ``dvc repro -s`` of a
    later stage) is not tokenized unchecked."""
    metrics_path = Path(metrics_path)
    try:
        gate = json.loads(metrics_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusError(f"{metrics_path} not found: run the validate stage first") from None
    except json.JSONDecodeError as err:
        raise CorpusError(f"{metrics_path} is not valid JSON ({err}): rerun validate") from None
    if not gate.get("success"):
        raise CorpusError(f"{metrics_path} says the corpus failed validation; fix it first")
    digest = folder_digest(corpus_dir)
    if gate.get("corpus_digest") != digest:
        raise CorpusError(
            f"{corpus_dir} is not the corpus {metrics_path} validated (corpus digest "
            f"{digest[:16]}, validated {str(gate.get('corpus_digest'))[:16]}): it changed after "
            "validation; run the validate stage on it (dvc repro validate)"
        )


def validate_corpus(
    corpus_dir: str | Path, data_config: DataConfig, config: ValidateConfig, report_dir: Path
) -> ValidationReport:
    """Check the corpus with GE suites and write results, metrics, summary and Data Docs."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    corpus_digest = folder_digest(corpus_dir)  # what was checked: the gate names it
    docs = documents_frame(corpus_dir)
    frames: dict[str, tuple[pd.DataFrame, list[Expectation]]] = {
        "documents": (docs, document_expectations(data_config, config)),
        "split_leakage": (leakage_frame(docs), leakage_expectations()),
    }
    if config.check_split_proportions:
        splits = split_frame(docs, data_config.splits.as_dict())
        frames["split_proportions"] = (splits, split_expectations(config))
    tasks = {
        name: task_frame(corpus_dir, name, docs["id"], data_config.image_size)
        for name in TABLE_TASKS
    }
    frames.update({f"task_{n}": (f, task_expectations(n)) for n, f in tasks.items()})
    with atomic_dir(report_dir / "data_docs") as docs_dir:
        context = _context(docs_dir)
        context.data_sources.add_pandas("corpus")
        results = {
            name: _run_suite(context, name, frame, expectations, config.sample_failures)
            for name, (frame, expectations) in frames.items()
        }
        context.build_data_docs(site_names=[DOCS_SITE])
        _without_render_times(docs_dir)
    failures = [
        f for name, r in results.items() for f in _failures(name, r, config.sample_failures)
    ]
    report = ValidationReport(
        success=all(r.success for r in results.values()),
        failures=failures,
        metrics={
            **_metrics(results, docs, tasks),
            "quarantined_rows": read_quarantine(corpus_dir).num_rows,
            "corpus_digest": corpus_digest,
        },
    )
    _write_report(report_dir, report, results)
    return report


# Data Docs are a DVC output, so equal data must give equal bytes. Every checkpoint runs under
# one fixed run identity (pages' paths and "run time" column carry it, not the clock), the
# expectations get ids derived from suite and position, and after rendering each page's
# remaining per-run values are normalized: the renderer's clock stamps (``?d=<now>`` after
# asset URLs, the batch's ``ge_load_time``) become the fixed run time, and the random element
# ids of collapsible blocks (uuid4) are renumbered in order of appearance within the page.
RUN_ID_NAME = "cm3leon-validate"
RUN_ID_TIME = "1970-01-01T00:00:00+00:00"
_FIXED_STAMP = "19700101T000000.000000Z"
_CLOCK_STAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _run_id():
    from great_expectations.core.run_identifier import RunIdentifier

    return RunIdentifier(run_name=RUN_ID_NAME, run_time=RUN_ID_TIME)


def _without_render_times(docs_dir: Path) -> None:
    for page in sorted(docs_dir.rglob("*.html")):
        text = _CLOCK_STAMP.sub(_FIXED_STAMP, page.read_text(encoding="utf-8"))
        atomic_write_text(page, _renumbered(text))


def _renumbered(text: str) -> str:
    order: dict[str, str] = {}
    return _UUID.sub(lambda m: order.setdefault(m[0], f"element-{len(order):04d}"), text)


# Per-run identifiers and clock times GE adds; dropped so equal data gives equal results.json.
RUN_IDENTITY_KEYS = ("run_id", "validation_id", "validation_time", "checkpoint_id", "ge_load_time")


def _without_run_identity(result: dict[str, Any]) -> dict[str, Any]:
    meta = result.get("meta", {})
    for key in RUN_IDENTITY_KEYS:
        meta.pop(key, None)
    meta.get("batch_markers", {}).pop("ge_load_time", None)
    for item in result.get("results", []):
        item.get("expectation_config", {}).pop("id", None)
    return result


def _write_report(
    report_dir: Path, report: ValidationReport, results: dict[str, ExpectationSuiteValidationResult]
) -> None:
    atomic_write_json(
        report_dir / "results.json",
        {n: _without_run_identity(r.to_json_dict()) for n, r in results.items()},
    )
    atomic_write_json(report_dir / "metrics.json", report.metrics)
    m = report.metrics
    met = m["expectations_evaluated"] - m["expectations_failed"]
    head = (
        f"# Corpus validation\n\n**{'PASSED' if report.success else 'FAILED'}**: {met} of "
        f"{m['expectations_evaluated']} expectations met ({m['success_percent']}%), "
        f"{m['documents']} documents. Details: `results.json`, `data_docs/index.html`.\n\n"
    )
    if m.get("quarantined_rows"):
        head += (
            f"{m['quarantined_rows']} invalid input rows were set aside by prepare "
            "(`data.on_invalid: quarantine`): the corpus's `quarantine.parquet` lists each with "
            "its file, row, document id and reason.\n\n"
        )
    atomic_write_text(report_dir / "summary.md", head + report.format_failures())
