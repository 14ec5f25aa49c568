"""The library's layering: no import cycle; lower layers never import higher ones.

Read from the code (:func:`cm3leon.source_closure.imported_files`), imports under
``if TYPE_CHECKING:`` excluded (they never run).
"""

from pathlib import Path

import pytest

from cm3leon.source_closure import import_closure, imported_files

from conftest import ROOT

MODULES = sorted(p for p in (ROOT / "cm3leon").rglob("*.py") if p.stat().st_size > 0)
# package -> packages its modules may never reach, directly or not
FORBIDDEN = {
    "model": ("training", "sft", "decoding", "inference", "evaluation", "lineage", "retrieval"),
    "decoding": ("training", "sft", "inference", "evaluation", "lineage", "retrieval"),
    "inference": ("training", "sft", "evaluation", "lineage"),
    "tokenizers": ("model", "training", "sft", "decoding", "inference", "evaluation", "lineage"),
    "data": ("tokenizers", "model", "training", "sft", "decoding", "inference", "evaluation"),
}


def package(path: Path) -> str:
    parts = path.relative_to(ROOT / "cm3leon").parts
    return parts[0] if len(parts) > 1 else ""


def test_no_import_cycle():
    graph = {
        m: [p for p in imported_files(m, ROOT) if p != m and p.stat().st_size > 0] for m in MODULES
    }
    state: dict[Path, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: Path, stack: list[Path]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                cycles.append(" -> ".join(str(p.relative_to(ROOT)) for p in cycle))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(layer):
    bad = []
    for module in (m for m in MODULES if package(m) == layer):
        for reached in import_closure([module], ROOT):
            parts = reached.parts
            if parts[0] == "cm3leon" and len(parts) > 2 and parts[1] in FORBIDDEN[layer]:
                bad.append(f"{module.relative_to(ROOT)} reaches {reached}")
    assert bad == []
