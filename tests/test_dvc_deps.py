"""dvc.yaml's code deps are exactly what each stage's command imports (STYLE.md §16).

DVC reruns a stage when a listed dep changes and dvc.lock records the deps' hashes as the
artifact's lineage, so a file the stage runs but dvc.yaml misses is lineage lost, and a file it
lists but never runs reruns the stage for nothing. The closure comes from the code itself
(:func:`cm3leon.source_closure.import_closure`); code deps are listed file by file.
"""

import copy
import shlex
from pathlib import Path

import yaml

from cm3leon.source_closure import import_closure

from conftest import ROOT

CODE_ROOTS = ("cm3leon", "stages", "flows", "benchmarks")


def stage_script(cmd: str) -> str:
    words = shlex.split(cmd)
    assert words[0] == "python" and words[1].endswith(".py"), f"not a python stage: {cmd}"
    return words[1]


def dep_drift(stages: dict, root: Path = ROOT) -> list[str]:
    """Each stage's missing and extra code deps, one message per file."""
    problems = []
    for name, stage in stages.items():
        script = stage_script(stage["cmd"])
        closure = {str(p) for p in import_closure([root / script], root)}
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        code = {d for d in deps if d.split("/")[0] in CODE_ROOTS}
        for dep in sorted(code):
            if (root / dep).is_dir():
                problems.append(f"stage {name}: {dep} is a folder; list the files it imports")
        for dep in sorted(closure - code):
            problems.append(f"stage {name}: runs {dep} but dvc.yaml does not list it")
        for dep in sorted(code - closure - {d for d in code if (root / d).is_dir()}):
            problems.append(f"stage {name}: lists {dep} but never imports it")
    return problems


def test_every_stage_lists_exactly_the_code_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert dep_drift(stages) == []


def test_a_missing_dep_line_is_named():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    changed = copy.deepcopy(stages)
    removed = "cm3leon/tasks.py"
    changed["sft"]["deps"].remove(removed)
    changed["index"]["deps"].append("cm3leon/lineage/report.py")
    assert dep_drift(changed) == [
        "stage index: lists cm3leon/lineage/report.py but never imports it",
        f"stage sft: runs {removed} but dvc.yaml does not list it",
    ]


def test_the_shard_runner_is_not_a_code_dep_of_the_data_stages():
    # A launch setting that cannot change the bytes must not rerun the stages.
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("tokenize", "index"):
        assert "flows/shards.py" not in stages[name]["deps"], name
