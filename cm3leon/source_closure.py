"""Which project source files a script runs: the import closure, read from the code itself.

DVC reruns a stage when one of its ``deps`` changes, and ``dvc.lock`` records their hashes as
the lineage of every artifact, so a stage's code deps must be exactly the files its command
imports — the test ``tests/test_dvc_deps.py`` checks ``dvc.yaml`` against
:func:`import_closure`. Training run keys hash the same closure (:func:`source_digest`), so a
code change never resumes a checkpoint made by other code.

The closure follows every ``import`` / ``from ... import`` statement that resolves to a file of
the project — top level and inside functions alike (a lazy import runs when its function
does) — except those under ``if TYPE_CHECKING:``, which never run. A module brings in the
``__init__.py`` of every package above it. A script's bare imports resolve against its own
folder first, as Python puts the script's folder first on ``sys.path``.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def import_closure(entries: Iterable[str | Path], root: str | Path = PROJECT_ROOT) -> list[Path]:
    """Every project file the ``entries`` import, directly or not, themselves included, as
    sorted relative paths (see :func:`_relative`). Empty files (bare package markers) are left
    out: one that gains code joins the closure."""
    root = Path(root).resolve()
    return sorted(_relative(p, root) for p in _closure(entries, root))


def source_digest(entries: Iterable[str | Path], root: str | Path = PROJECT_ROOT) -> str:
    """sha256 over the relative path and bytes of every file in the import closure of
    ``entries``: the same code gives the same digest wherever the project lies."""
    root = Path(root).resolve()
    named = sorted((_relative(p, root).as_posix(), p) for p in _closure(entries, root))
    digest = hashlib.sha256()
    for name, path in named:
        digest.update(name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _closure(entries: Iterable[str | Path], root: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [Path(e).resolve() for e in entries]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(p for p in imported_files(path, root) if p not in seen)
    return {p for p in seen if p.stat().st_size > 0}


def imported_files(path: Path, root: Path = PROJECT_ROOT) -> list[Path]:
    """The project files that the import statements of ``path`` run (one step, not the
    closure)."""
    root = Path(root).resolve()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Path] = []
    for node in _running_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found += _resolve(alias.name, path, root)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: the package of this file
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                parts = list(base.relative_to(root).parts) + (node.module or "").split(".")
                module = ".".join(p for p in parts if p)
            else:
                module = node.module or ""
            found += _resolve(module, path, root)
            for alias in node.names:  # `from package import submodule`
                found += _resolve(f"{module}.{alias.name}", path, root, submodule_only=True)
    return found


def _running_nodes(tree: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, importer: Path, root: Path, submodule_only: bool = False) -> list[Path]:
    """The project files importing ``module`` runs: its own file and each package __init__."""
    parts = module.split(".")
    in_package = (importer.parent / "__init__.py").is_file()
    for base in (root,) if in_package else (importer.parent, root):  # a script's folder first
        files = []
        for depth in range(1, len(parts) + 1):
            stem = base.joinpath(*parts[:depth])
            if (stem / "__init__.py").is_file():
                files.append(stem / "__init__.py")
            elif stem.with_suffix(".py").is_file() and depth == len(parts):
                files.append(stem.with_suffix(".py"))
            else:
                files = []
                break
        if files:
            return files[-1:] if submodule_only else files
        if base == root:
            break
    return []


def _relative(path: Path, root: Path) -> Path:
    """``path`` relative to ``root``; a file outside it (a copy of a project's stage script
    beside an installed library) relative to its own project — the nearest folder above it
    holding ``dvc.yaml`` — or by its name: never an absolute path, so the same code gives the
    same :func:`source_digest` wherever the project lies."""
    if path.is_relative_to(root):
        return path.relative_to(root)
    for folder in path.parents:
        if (folder / "dvc.yaml").is_file():
            return path.relative_to(folder)
    return Path(path.name)
