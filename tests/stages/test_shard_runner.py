"""The data stages' shard runner (stages/shard_runner.py): serial in process without flows/,
any other runner through flows/shards.py, which validates the variables."""

import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

import flows.shards
from cm3leon import numerics
from cm3leon.shards import SERIAL, map_rows

from conftest import ROOT, load_stage_module, project_env

shard_runner = load_stage_module("shard_runner")


@pytest.fixture
def environ(monkeypatch):
    """The process environment without any CM3LEON_SHARD_* or batch variable."""
    for name in list(os.environ):
        if name.startswith("CM3LEON_"):
            monkeypatch.delenv(name)
    return monkeypatch


def double(executor):
    return map_rows("double", partial(np.multiply, 2), np.arange(20), 4, executor)


def test_the_variable_names_are_those_of_flows_shards():
    assert shard_runner.RUNNER_VARIABLE == flows.shards.ENV_RUNNER
    assert shard_runner.ADDRESS_VARIABLE == flows.shards.ENV_ADDRESS


@pytest.mark.parametrize(
    ("env", "asks"),
    [
        ({}, False),
        ({"CM3LEON_SHARD_RUNNER": "serial"}, False),
        ({"CM3LEON_SHARD_RUNNER": " "}, False),
        ({"CM3LEON_SHARD_RUNNER": "serial", "CM3LEON_SHARD_WORKERS": "3"}, False),
        ({"CM3LEON_BATCHES_PER_SHARD": "8"}, False),
        ({"CM3LEON_SHARD_RUNNER": "dask"}, True),
        ({"CM3LEON_SHARD_RUNNER": "spark"}, True),  # flows/shards.py names the valid ones
        ({"CM3LEON_SHARD_ADDRESS": "tcp://scheduler:8786"}, True),  # ... and rejects this
    ],
)
def test_which_environments_ask_for_a_shard_runner(env, asks):
    assert shard_runner.asks_for_a_shard_runner(env) is asks


SERIAL_SCRIPT = f"""
import sys
sys.path.insert(0, {str(ROOT / "stages")!r})
from shard_runner import run_on_shard_runner
from cm3leon.shards import SERIAL

executor = run_on_shard_runner("toy", "doubling", lambda executor: executor)
print(executor is SERIAL, sorted(name for name in sys.modules if name.startswith("flows")))
"""


def test_the_serial_path_runs_in_process_without_importing_flows(tmp_path):
    env = {k: v for k, v in project_env().items() if not k.startswith("CM3LEON_")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", SERIAL_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "toy: doubling on the serial shard runner\nTrue []\n"


def test_another_runner_runs_through_flows_shards(environ, prefect_server, capsys):
    environ.setenv("CM3LEON_SHARD_RUNNER", "threads")
    environ.setenv("CM3LEON_SHARD_WORKERS", "2")
    environ.setenv("CM3LEON_BATCHES_PER_SHARD", "1")
    result = shard_runner.run_on_shard_runner("toy", "doubling", double)
    assert result.tobytes() == double(SERIAL).tobytes()
    assert capsys.readouterr().out.startswith("toy: doubling on the threads shard runner\n")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CM3LEON_SHARD_RUNNER": "spark"}, "CM3LEON_SHARD_RUNNER='spark' is not one of serial"),
        ({"CM3LEON_SHARD_ADDRESS": "tcp://x:1"}, "only dask and ray connect to a cluster"),
    ],
)
def test_a_data_stage_rejects_bad_settings_naming_the_variable(tmp_path, env, message):
    """The index stage stops before any work, with the error of flows/shards.py and exit 1."""
    args = ["--params", str(ROOT / "params.yaml"), "--corpus", "corpus", "--tokens", "tokens"]
    for name in ("retriever-out", "retrieval-out", "metrics", "live"):
        args += [f"--{name}", str(tmp_path / name)]
    # Without CM3LEON_* and without kernel variables an earlier test left in this process
    # (the stage would say it overrides them: right, but not this test's one line).
    base = {
        k: v
        for k, v in project_env().items()
        if not k.startswith("CM3LEON_") and k not in numerics.KERNEL_VARIABLES
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "index.py"), *args],
        cwd=tmp_path,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.startswith("index: error: ") and message in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "metrics").exists()
