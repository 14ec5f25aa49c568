"""Shard runners: real Prefect task runners (threads, Dask, Ray) encode and embed shards with
results byte-identical to the serial path; bad settings and failing shards are loud."""

import importlib.util
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

from cm3leon.config import RetrieverConfig, VQConfig
from cm3leon.retrieval.dual_encoder import DualEncoder
from cm3leon.retrieval.memory_bank import Embedder
from cm3leon.shards import SERIAL, map_rows, shard_bounds
from cm3leon.tokenizers.vq import VQModel
from cm3leon.tokenizers.vq_training import encode_images
from flows.shards import ShardSettings, ShardSettingsError, run_sharded

from conftest import ROOT, project_env, task_run_states

ROWS, BATCH, BATCHES_PER_SHARD = 37, 4, 2  # 5 shards per map: 8 + 8 + 8 + 8 + 5 rows


@pytest.fixture(scope="module")
def work():
    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=8, code_dim=4, channels=(8, 16), num_res_blocks=1))
    encoder = DualEncoder(
        RetrieverConfig(
            embed_dim=8, text_width=16, text_layers=1, text_heads=2, image_channels=(8, 8)
        ),
        text_vocab_size=40,
        image_size=16,
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (ROWS, 16, 16, 3), dtype=np.uint8)
    texts = [rng.integers(0, 40, rng.integers(1, 9)).tolist() for _ in range(ROWS)]

    def encode_and_embed(executor):
        from prefect.runtime import flow_run

        embed = Embedder(encoder, BATCH, executor)
        return {
            "codes": map_rows(
                "encode", partial(encode_images, vq, batch_size=BATCH), images, BATCH, executor
            ),
            "text": embed.text(texts),
            "image": embed.image(images),
            "flow_run_id": flow_run.id,
        }

    return encode_and_embed


@pytest.mark.parametrize(
    "runner",
    [
        "threads",
        "dask",
        pytest.param(
            "ray",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("prefect_ray") is None,
                reason="prefect-ray is not installed (pip install -e '.[ray]')",
            ),
        ),
    ],
)
def test_parallel_shards_equal_the_serial_path(runner, work, prefect_server):
    serial = work(SERIAL)
    assert serial["flow_run_id"] is None  # the serial path runs without Prefect
    settings = ShardSettings(runner=runner, workers=2, batches_per_shard=BATCHES_PER_SHARD)
    parallel = run_sharded("test", work, settings)
    for key in ("codes", "text", "image"):
        assert parallel[key].dtype == serial[key].dtype
        assert parallel[key].tobytes() == serial[key].tobytes(), key
    assert serial["codes"].shape == (ROWS, 16) and serial["text"].shape == (ROWS, 8)
    # every shard of the three maps ran as a task run of the stage's one flow run
    shards = len(shard_bounds(ROWS, BATCH, BATCHES_PER_SHARD))
    states = task_run_states(parallel["flow_run_id"], expected=3 * shards)
    assert states == ["COMPLETED"] * (3 * shards)


TEMPORARY_SERVER_SCRIPT = """
from functools import partial

import numpy as np
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.runtime import flow_run

from cm3leon.shards import map_rows
from flows.shards import ShardSettings, run_sharded


def work(executor):
    doubled = map_rows("double", partial(np.multiply, 2), np.arange(40), 4, executor)
    return doubled, flow_run.id


if __name__ == "__main__":
    doubled, run_id = run_sharded("t", work, ShardSettings("dask", 2, None, 1))
    this_run = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=this_run)
    print("RESULT", doubled.tolist() == list(range(0, 80, 2)), len(runs))
"""


def test_dask_workers_report_to_the_temporary_server_of_their_stage(tmp_path):
    """With no Prefect server configured, a stage starts one temporary server, its Dask
    workers use it (rather than each starting a server of its own), and every shard's task run
    is recorded there."""
    script = tmp_path / "stage.py"
    script.write_text(TEMPORARY_SERVER_SCRIPT)
    env = {k: v for k, v in project_env().items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT True 10" in done.stdout  # 40 rows in shards of 4: 10 task runs, all seen
    assert (done.stdout + done.stderr).count("Starting temporary server") == 1


def explode_on_row(bad: int, rows: np.ndarray) -> np.ndarray:
    if bad in rows:
        raise ValueError(f"row {bad} cannot be encoded")
    return rows * 2


def test_a_failing_shard_fails_the_work(prefect_server):
    settings = ShardSettings(runner="threads", workers=2, batches_per_shard=1)

    def work(executor):
        return map_rows("double", partial(explode_on_row, 13), np.arange(20), 4, executor)

    with pytest.raises(ValueError, match="row 13 cannot be encoded"):
        run_sharded("failing", work, settings)


def test_settings_come_from_the_environment():
    assert ShardSettings.from_env({}) == ShardSettings()
    assert ShardSettings.from_env({}).runner == "serial"
    env = {
        "CM3LEON_SHARD_RUNNER": "dask",
        "CM3LEON_SHARD_WORKERS": "3",
        "CM3LEON_SHARD_ADDRESS": "tcp://scheduler:8786",
        "CM3LEON_BATCHES_PER_SHARD": "8",
    }
    settings = ShardSettings.from_env(env)
    assert settings == ShardSettings("dask", 3, "tcp://scheduler:8786", 8)
    assert ShardSettings.from_env(settings.environ()) == settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CM3LEON_SHARD_RUNNER": "spark"}, "CM3LEON_SHARD_RUNNER='spark' is not one of serial"),
        ({"CM3LEON_SHARD_WORKERS": "two"}, "CM3LEON_SHARD_WORKERS='two' is not an integer"),
        ({"CM3LEON_SHARD_WORKERS": "0"}, "CM3LEON_SHARD_WORKERS=0 must be >= 1"),
        ({"CM3LEON_BATCHES_PER_SHARD": "-1"}, "CM3LEON_BATCHES_PER_SHARD=-1 must be >= 1"),
        (
            {"CM3LEON_SHARD_RUNNER": "threads", "CM3LEON_SHARD_ADDRESS": "tcp://x:1"},
            "only dask and ray connect to a cluster",
        ),
    ],
)
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ShardSettingsError, match=message):
        ShardSettings.from_env(env)
