"""``cm3leon verify``: does this machine reproduce the committed run? (README, Reproducibility)

The committed ``dvc.lock`` holds the hash of every output the committed code and params made.
:func:`verify` clones the project at a revision into a scratch folder (the user's workspace and
cache are left alone), runs ``dvc repro <through>`` there — the stages up to ``through``, from
scratch, each in the numeric mode its params name (:mod:`cm3leon.numerics`) — and compares
the clone's ``dvc.lock`` with the committed one, output by output in DAG order:

- ``identical``: same hash;
- ``same result``: a git-tracked metrics or plots output whose hash differs only through what
  measures the machine (``stage_seconds``, throughput, MFU, the matmul peak:
  :data:`TIMING_KEYS`, as JSON keys or as the names of dvclive's curve files);
- ``differs``: anything else. The first such output is where the run parted from the committed
  one; :func:`verify` then sets the numeric environment the committed model folder recorded
  beside this machine's (``config.json`` ``environment``), which says whether the kernels,
  the torch build or the thread count differed.

It runs DVC and git as commands, like the rest of :mod:`cm3leon.lineage`.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cm3leon.lineage.lineage import LineageError, lock_at, read_lock, resolve_revision

# Metrics that measure the machine, not the result (a substring of the key).
TIMING_KEYS = ("seconds", "per_second", "mfu", "matmul_peak")
DEFAULT_THROUGH = "tokenize"  # the data and tokenizer stages: ~5 minutes on 2 cores


def _is_timing(key: str) -> bool:
    return any(part in key for part in TIMING_KEYS)


def without_timing(value: Any) -> Any:
    """A metrics document without the keys that measure the machine (at any depth)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not _is_timing(k)}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def same_result(old: dict[str, str], new: dict[str, str], tolerance: float = 0.0) -> bool:
    """Whether two versions of a tracked metrics or plots output (``{file: text}``; a single
    file under the key ``""``) agree once what measures the machine is left out: files named
    after a timing key (``tokens_per_second.tsv``) and, in JSON, keys of :data:`TIMING_KEYS`.
    With ``tolerance`` > 0 every number (JSON values, the cells of dvclive's TSV curves) may
    differ by that relative amount (``math.isclose(rel_tol=tolerance)``)."""

    def kept(files: dict[str, str]) -> dict[str, str]:
        return {name: text for name, text in files.items() if not _is_timing(Path(name).stem)}

    old, new = kept(old), kept(new)
    if set(old) != set(new):
        return False
    for name, text in old.items():
        if text == new[name]:
            continue
        try:
            a, b = without_timing(json.loads(text)), without_timing(json.loads(new[name]))
        except json.JSONDecodeError:
            a, b = _cells(text), _cells(new[name])  # a TSV curve
        if not _close(a, b, tolerance):
            return False
    return True


def _cells(text: str) -> list[list[Any]]:
    """A TSV file's cells, numbers as floats."""

    def cell(value: str) -> Any:
        try:
            return float(value)
        except ValueError:
            return value

    return [[cell(v) for v in line.split("\t")] for line in text.splitlines()]


def _close(a: Any, b: Any, tolerance: float) -> bool:
    """Equal, numbers within ``tolerance`` (relative; NaN equals NaN: JSON metrics hold NaN
    for a loss with no targets), at any depth of dicts and lists."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b, strict=True))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        if math.isnan(a) or math.isnan(b):  # a metric that is NaN in both runs agrees
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=0.0)
    return a == b


def compare_locks(
    reference: dict[str, dict[str, Any]],
    rerun: dict[str, dict[str, Any]],
    read_reference: Callable[[str], dict[str, str] | None],
    read_rerun: Callable[[str], dict[str, str] | None],
    tolerance: float = 0.0,
) -> list[dict[str, Any]]:
    """One row per output of every stage ``rerun`` ran, in its order: ``stage``, ``path``,
    ``verdict`` and both hashes. ``read_reference(path)`` / ``read_rerun(path)`` return an
    output's text files (``{relative name: text}``, ``""`` for a file) where they can
    (git-tracked metrics and plots), else None: those are compared by :func:`same_result`
    when their hashes differ. Verdicts: ``identical``, ``same result``, ``differs``, ``not in
    reference``; with ``tolerance`` > 0 (comparing across architectures or GPUs, where bytes
    cannot agree) also ``within tolerance`` for metrics whose numbers agree within it, and
    ``hash differs`` for an output that cannot be read as text (a model, the tokens): the
    metrics decide then, not the hashes."""
    rows = []
    for stage, record in rerun.items():
        expected = {o["path"]: o.get("md5") for o in reference.get(stage, {}).get("outs", [])}
        for out in record.get("outs", []):
            path, md5 = out["path"], out.get("md5")
            if path not in expected:
                verdict = "not in reference"
            elif expected[path] == md5:
                verdict = "identical"
            else:
                old, new = read_reference(path), read_rerun(path)
                if old is None or new is None:
                    verdict = "hash differs" if tolerance > 0 else "differs"
                elif same_result(old, new):
                    verdict = "same result"
                elif tolerance > 0 and same_result(old, new, tolerance):
                    verdict = "within tolerance"
                else:
                    verdict = "differs"
            rows.append(
                {
                    "stage": stage,
                    "path": path,
                    "verdict": verdict,
                    "reference": expected.get(path),
                    "rerun": md5,
                }
            )
    return rows


def _files_in_tree(root: Path, path: str) -> dict[str, str] | None:
    """An output's text files in a checkout (None when absent or not text)."""
    target = root / path
    try:
        if target.is_file():
            return {"": target.read_text(encoding="utf-8")}
        if target.is_dir():
            return {
                f.relative_to(target).as_posix(): f.read_text(encoding="utf-8")
                for f in sorted(target.rglob("*"))
                if f.is_file()
            }
    except UnicodeDecodeError:
        return None
    return None


def _files_at(project: Path, commit: str, path: str) -> dict[str, str] | None:
    """An output's text files as git holds them at ``commit`` (None when git does not: a
    DVC-cached output)."""
    listed = _git(project, "ls-tree", "-r", "--name-only", commit, "--", path)
    names = [n for n in listed.stdout.splitlines() if n]
    if listed.returncode != 0 or not names:
        return None
    files = {}
    for name in names:
        text = _show(project, commit, name)
        if text is None:
            return None
        files["" if name == path else name[len(path) + 1 :]] = text
    return files


def environment_of(folder: Path) -> dict[str, Any] | None:
    """The numeric environment a model folder's ``config.json`` records, if any."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("environment")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def environment_diff(
    reference: dict[str, Any] | None, rerun: dict[str, Any] | None
) -> dict[str, tuple[Any, Any]]:
    """``key: (reference, rerun)`` for every environment entry that differs (flattened)."""

    def flat(env: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (env or {}).items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    a, b = flat(reference), flat(rerun)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _git(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)


def _show(project: Path, commit: str, path: str) -> str | None:
    done = _git(project, "show", f"{commit}:{path}")
    return done.stdout if done.returncode == 0 else None


def verify(
    project: str | Path,
    through: str = DEFAULT_THROUGH,
    rev: str = "HEAD",
    workdir: str | Path | None = None,
    keep: bool = False,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """Rerun the stages up to ``through`` in a clone of ``project`` at ``rev`` and compare its
    ``dvc.lock`` with the committed one (module docstring; ``tolerance``: see
    :func:`compare_locks`). The clone lives in ``workdir`` (default: a new temporary folder),
    removed afterwards unless ``keep``. DVC's output goes to this process's stderr, so its
    progress shows."""
    project = Path(project).resolve()
    commit = resolve_revision(project, rev)
    reference = lock_at(project, commit)
    if through not in yaml.safe_load(_show(project, commit, "dvc.yaml") or "{}").get("stages", {}):
        raise LineageError(f"no stage {through!r} in dvc.yaml at {rev}")
    scratch = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="verify-"))
    clone = scratch / "clone"
    try:
        done = _git(project, "clone", "--quiet", "--no-checkout", str(project), str(clone))
        if done.returncode != 0:
            raise LineageError(f"git clone of {project} failed: {done.stderr.strip()}")
        done = _git(clone, "checkout", "--quiet", commit)
        if done.returncode != 0:
            raise LineageError(f"git checkout {commit} failed: {done.stderr.strip()}")
        dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
        # DVC's progress goes to stderr: stdout is the result's (``--json`` stays parseable)
        try:
            progress: int | None = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            progress = None  # a stderr without a file (an embedding app): DVC's own stdout
        ran = subprocess.run([dvc, "repro", through], cwd=clone, stdout=progress)
        if ran.returncode != 0:
            raise LineageError(f"dvc repro {through} failed in {clone} (exit {ran.returncode})")
        rerun = read_lock(clone)

        rows = compare_locks(
            reference,
            rerun,
            lambda path: _files_at(project, commit, path),
            lambda path: _files_in_tree(clone, path),
            tolerance,
        )
        first = next((row for row in rows if row["verdict"] == "differs"), None)
        parted = next((r for r in rows if r["verdict"] in ("differs", "hash differs")), None)
        result: dict[str, Any] = {
            "rev": rev,
            "commit": commit,
            "through": through,
            "tolerance": tolerance,
            "outputs": rows,
            "reproduced": first is None,
            "first_difference": first,
        }
        if parted is not None:
            result["environment"] = _explain(project, clone, rows, parted)
        return result
    finally:
        if not keep and workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def _explain(
    project: Path, clone: Path, rows: list[dict[str, Any]], first: dict[str, Any]
) -> dict[str, Any]:
    """The numeric environments of the model folder nearest the first difference: the one the
    committed run recorded (read from the workspace when its hash there is the committed one)
    and this rerun's."""
    models = [row for row in rows if (clone / row["path"] / "config.json").is_file()]
    upto = rows.index(first)
    candidates = [row for row in models if rows.index(row) <= upto] or models
    if not candidates:
        return {"note": "no model folder among the rerun's outputs records an environment"}
    row = candidates[-1]
    workspace = read_lock(project) if (project / "dvc.lock").is_file() else {}
    here = {o["path"]: o.get("md5") for r in workspace.values() for o in r.get("outs", [])}
    committed = None
    if here.get(row["path"]) == row["reference"]:
        committed = environment_of(project / row["path"])
    rerun = environment_of(clone / row["path"])
    return {
        "model": row["path"],
        "committed": committed,
        "rerun": rerun,
        "differs": environment_diff(committed, rerun) if committed is not None else None,
        "note": None
        if committed is not None
        else "the workspace does not hold the committed model folder (dvc pull or dvc checkout "
        "it to compare environments)",
    }


def format_verify(result: dict[str, Any]) -> str:
    """The ``cm3leon verify`` text."""
    within = f" within {result['tolerance']:g}" if result.get("tolerance") else ""
    lines = [
        f"verify {result['rev']} ({result['commit'][:10]}) through {result['through']}: "
        + (f"reproduced{within}" if result["reproduced"] else f"NOT reproduced{within}")
    ]
    for row in result["outputs"]:
        lines.append(
            f"  {row['verdict']:16s} {row['stage']:10s} {row['path']}"
            + (
                f"  (committed {row['reference']}, here {row['rerun']})"
                if row["verdict"] == "differs"
                else ""
            )
        )
    first = result.get("first_difference")
    if first is not None:
        lines.append(f"first difference: {first['path']} (stage {first['stage']})")
    if result.get("environment"):
        env = result["environment"]
        if env.get("note"):
            lines.append(f"  {env['note']}")
        if env.get("differs"):
            lines.append(f"  numeric environment of {env['model']}, committed -> here:")
            lines.extend(f"    {k}: {a} -> {b}" for k, (a, b) in env["differs"].items())
        elif env.get("differs") == {}:
            lines.append(
                f"  {env['model']} records the same numeric environment: the code, params "
                "or inputs of the rerun differ, or a kernel outside the pins does"
            )
    return "\n".join(lines)
