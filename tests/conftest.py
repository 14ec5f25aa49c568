"""Shared fixtures: throw-away copies of the project with tiny params for end-to-end tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

# No network in tests: keep Prefect's server telemetry off.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = (
    "cm3leon",
    "stages",
    "flows",
    "dvc.yaml",
    "params.yaml",
    "data/raw",
    ".dvcignore",
    ".gitignore",
)

# Small enough to run the DAG in seconds, big enough for split proportions to be meaningful.
TINY_PARAMS = {
    "data": {"shapeworld": {"num_images": 120}, "shard_size": 50},
    "tokenize": {
        "text_vocab_size": 300,
        "encode_batch_size": 16,  # several shards per split, for the shard-runner tests
        "vq": {"codebook_size": 32, "code_dim": 8, "channels": [16, 16]},
        "train": {"steps": 15, "batch_size": 8, "log_every": 5},
    },
    "index": {
        "encoder": {
            "embed_dim": 16,
            "text_width": 32,
            "text_layers": 1,
            "text_heads": 2,
            "image_channels": [8, 16, 16],
        },
        "train": {"steps": 20, "batch_size": 32, "warmup_steps": 5, "log_every": 5},
        "eval_queries": 20,
        "embed_batch_size": 16,
    },
    "sft": {
        "train": {
            "steps": 4,
            "micro_batch_size": 4,
            "log_every": 2,
            "eval_every": 2,
            "eval_batches": 1,
            "checkpoint_every": 2,
        },
    },
    "pretrain": {
        "model": {"preset": "tiny", "n_head": None},  # the preset's heads, not the CPU run's 8
        "train": {
            "steps": 4,
            "micro_batch_size": 4,
            "log_every": 2,
            "eval_every": 2,
            "eval_batches": 2,
            "checkpoint_every": 2,
        },
    },
    "evaluate": {
        "prompts": 6,
        "task_examples": 6,
        "batch_size": 64,
        "grid_examples": 3,
        "retrieved": 2,  # the default is 0; the tests exercise retrieval at inference
        "decoding": {"samples": 2},
        "studies": {
            "prompts": 4,
            "cfg_weights": [1.0, 3.0],
            "strategies": ["top_p", "mix"],
            "samples": [1, 2],
            "retrieved": [0, 1],
        },
    },
    "flow": {"retries": 0, "retry_delay_seconds": 0},
}


def deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def project_env() -> dict[str, str]:
    """The environment stage commands run in: this interpreter's `python` and `dvc` first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=project_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=check)


def task_run_states(flow_run_id, expected: int, timeout: float = 60.0) -> list[str]:
    """The flow run's task-run states once at least ``expected`` runs are recorded and every one
    of them is final (or ``timeout`` seconds have passed). Prefect 3 records
    task-run states in the background, so right after the flow returns the API may still hold
    some as PENDING or RUNNING, or as a run with no state recorded yet (``state`` is None); on a
    loaded machine that lag reaches seconds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        states = [run.state.type.value if run.state else "NO STATE" for run in runs]
        final = [s for s in states if s not in ("NO STATE", "PENDING", "SCHEDULED", "RUNNING")]
        if (len(states) >= expected and len(final) == len(states)) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


@pytest.fixture(scope="session")
def prefect_server():
    """One throw-away Prefect server (and PREFECT_HOME) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def make_project(tmp_path_factory):
    """Factory: a git + DVC repo holding a copy of this project with tiny params."""

    def make(params: dict | None = None) -> Path:
        root = tmp_path_factory.mktemp("project")
        for name in PROJECT_FILES:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif source.exists():
                shutil.copy2(source, root / name)
        values = yaml.safe_load((ROOT / "params.yaml").read_text())
        deep_update(values, TINY_PARAMS)
        deep_update(values, params or {})
        (root / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
        run(["git", "init", "-q"], cwd=root)
        dvc("init", "-q", cwd=root)
        dvc("config", "core.analytics", "false", cwd=root)
        # Like a clone, the repo has a commit (dvclive 3.49 fails in a repo with none).
        run(["git", "add", "-A"], cwd=root)
        identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
        run(["git", *identity, "commit", "-qm", "project copy"], cwd=root)
        return root

    return make


def corrupt_corpus(root):
    """Blank one caption in a shard and accept the change as prepare's output (`dvc commit`),
    as if a corrupted artifact had been pushed to the cache."""
    shard = root / "data/corpus/shard-00000.parquet"
    table = pq.read_table(shard)
    captions = table.column("caption").to_pylist()
    captions[3] = ""
    table = table.set_column(table.schema.get_field_index("caption"), "caption", pa.array(captions))
    pq.write_table(table, shard)
    dvc("commit", "-f", "prepare", cwd=root)


def add_downstream_stage(root):
    dag = yaml.safe_load((root / "dvc.yaml").read_text())
    dag["stages"]["downstream"] = {
        "cmd": "python -c \"open('downstream.txt', 'w').write('ran')\"",
        "deps": ["reports/validation/summary.md"],
        "outs": ["downstream.txt"],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))


def load_stage_module(name: str):
    """A helper module of stages/, as the stage scripts import it (by its bare name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
