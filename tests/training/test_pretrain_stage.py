"""The pretrain stage through the real DeepSpeed engine: a tiny run, kill-and-resume, run keys,
and 2-process (torchrun, ZeRO-2) equivalence with 1 process at the same global batch."""

import csv
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cm3leon.config import (
    DataConfig,
    IndexConfig,
    PretrainConfig,
    RetrieverConfig,
    RetrieverTrainConfig,
    ShapeWorldConfig,
    TokenizeConfig,
    VQConfig,
    VQTrainConfig,
    load_params,
)
from cm3leon.data.prepare import prepare_corpus
from cm3leon.model.io import load_decoder
from cm3leon.numerics import PINNED_KERNELS
from cm3leon.retrieval.memory_bank import build_memory_bank
from cm3leon.tokenizers.corpus_tokenization import tokenize_corpus
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.training.pretraining import (
    equal_compute_baseline,
    load_documents,
    load_neighbors,
    step_samples,
    train_sample,
)
from cm3leon.training.run_key import run_key
from cm3leon.training.sequences import RetrievalAugmentedSequences

ROOT = Path(__file__).resolve().parents[2]
DATA = DataConfig(shapeworld=ShapeWorldConfig(num_images=120))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_inputs")
    tokenize = TokenizeConfig(
        text_vocab_size=300,
        vq=VQConfig(codebook_size=32, code_dim=8, channels=(16, 16)),
        train=VQTrainConfig(steps=5, batch_size=8),
    )
    index = IndexConfig(
        encoder=RetrieverConfig(
            embed_dim=16, text_width=32, text_layers=1, text_heads=2, image_channels=(8, 16, 16)
        ),
        train=RetrieverTrainConfig(steps=5, batch_size=16, warmup_steps=1),
        eval_queries=5,
    )
    prepare_corpus(DATA, 1, root / "corpus")
    tokenize_corpus(root / "corpus", DATA, tokenize, 1, root / "vq", root / "text", root / "tokens")
    build_memory_bank(
        root / "corpus", root / "tokens", DATA, index, 1, root / "retriever", root / "retrieval"
    )
    return root


def params_file(folder: Path, **train) -> Path:
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    values["pretrain"]["model"] = {"preset": "tiny"}
    values["pretrain"]["train"].update(
        {
            "steps": 8,
            "micro_batch_size": 4,
            "log_every": 1,
            "eval_every": 4,
            "eval_batches": 1,
            "checkpoint_every": 2,
            "warmup_steps": 2,
            **train,
        }
    )
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def command(
    inputs: Path,
    out: Path,
    params: Path,
    launcher: list[str] | None = None,
    script: Path = ROOT / "stages" / "pretrain.py",
) -> list[str]:
    args = [
        "--params",
        str(params),
        "--tokens",
        str(inputs / "tokens"),
        "--retrieval",
        str(inputs / "retrieval"),
        "--out",
        str(out / "model"),
        "--metrics",
        str(out / "metrics.json"),
        "--live",
        str(out / "live"),
        "--scratch",
        str(out / "scratch"),
    ]
    return [*(launcher or [sys.executable]), str(script), *args]


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def losses(out: Path) -> list[float]:
    with open(out / "live/plots/metrics/train/loss.tsv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle, delimiter="\t")]


def weights(out: Path) -> dict[str, torch.Tensor]:
    model, _, meta, _ = load_decoder(out / "model")
    assert meta["stage"] == "pretrain"
    return model.state_dict()


def test_tiny_run_exports_a_loadable_model_and_logs(inputs, tmp_path):
    proc = run(command(inputs, tmp_path, params_file(tmp_path)))
    # progress: no terminal here, so no bar, but one line per evaluation (eval_every 4 of 8)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: step ")]
    assert [line.split(" | ")[0] for line in lines] == ["pretrain: step 4/8", "pretrain: step 8/8"]
    assert re.fullmatch(
        r"pretrain: step 8/8 \| loss \d+\.\d{3} \| val \d+\.\d{3} \| [\d,]+ tokens/s"
        r" \| elapsed \d+:\d\d:\d\d ETA 0:00:00",
        lines[-1],
    ), lines[-1]
    assert "\r" not in proc.stderr.replace("\r\n", "\n")  # no bar redraws in a log
    _, vocab, meta, _ = load_decoder(tmp_path / "model")
    assert meta["shape"]["n_layer"] == 2 and meta["shape"]["vocab_size"] == vocab.size
    env = meta["environment"]  # what shaped the numbers: explains a hash that differs
    assert env["device"] == "cpu" and env["precision"] == "fp32" and env["processes"] == 1
    # the stage pins ATen to AVX2 in the reproducible mode; this test process is not pinned
    # (on an AVX-512 machine it reports AVX512)
    pinned = env["numerics"]["mode"] == "reproducible"
    expected = (
        PINNED_KERNELS["ATEN_CPU_CAPABILITY"].upper()
        if pinned
        else torch.backends.cpu.get_cpu_capability()
    )
    assert env["cpu_capability"] == expected
    assert env["threads"] >= 1 and env["torch"] == torch.__version__ and env["cpu"]
    series = losses(tmp_path)
    assert len(series) == 8 and series[-1] < series[0]
    for name in (
        "val/loss",
        "val/text_loss",
        "val/image_loss",
        "val/query_loss",
        "train/lr",
        "train/tokens_per_second",
        "train/tokens_seen",
        "train/useful_token_fraction",
        "train/mfu",
    ):
        assert (tmp_path / "live/plots/metrics" / f"{name}.tsv").is_file(), name
    useful = (tmp_path / "live/plots/metrics/train/useful_token_fraction.tsv").read_text()
    assert all(0 < float(line.split("\t")[-1]) <= 1 for line in useful.splitlines()[1:])
    # model FLOPs of the targets over the measured matmul peak: a fraction, and the tiny test
    # model with its evaluations and checkpoints every few steps is far from the peak
    mfu = (tmp_path / "live/plots/metrics/train/mfu.tsv").read_text()
    assert all(0 < float(line.split("\t")[-1]) < 0.9 for line in mfu.splitlines()[1:])


def test_image_positions_export_a_shape_with_image_cells(inputs, tmp_path):
    params = params_file(tmp_path, steps=2)
    values = yaml.safe_load(params.read_text())
    values["pretrain"]["model"]["image_positions"] = True
    params.write_text(yaml.safe_dump(values))
    run(command(inputs, tmp_path, params))
    model, vocab, meta, _ = load_decoder(tmp_path / "model")
    assert meta["shape"]["image_cells"] == 64  # the tokens' 8x8 grid
    assert model.shape.image_offset == vocab.image_offset
    assert model.cell_embedding.weight.shape == (65, model.shape.d_model)


@pytest.mark.parametrize("k_max", [1, 2])
def test_no_retrieval_baseline_sees_as_many_tokens(inputs, k_max):
    config = load_params(ROOT / "params.yaml").pretrain
    train = dataclasses.replace(config.train, steps=300)
    config = dataclasses.replace(config, retrieval_k_max=k_max, train=train)
    baseline = equal_compute_baseline(inputs / "tokens", inputs / "retrieval", config, seed=3)
    assert baseline.retrieval_k_max == 0
    assert baseline.train.warmup_steps == config.train.warmup_steps
    # k ~ uniform{0..k_max} neighbors make a sample 1 + k_max / 2 documents on average: the
    # baseline takes that many times the documents per step, in about the same steps
    documents = 1 + k_max / 2
    assert baseline.train.micro_batch_size > (documents - 0.25) * config.train.micro_batch_size
    assert baseline.train.micro_batch_size < (documents + 0.25) * config.train.micro_batch_size
    assert abs(baseline.train.steps - config.train.steps) <= 0.1 * config.train.steps
    # Both runs' own training streams, over their whole length, see the same training tokens.
    ids, docs = load_documents(inputs / "tokens", "train")
    neighbors = load_neighbors(inputs / "retrieval", ids, ids)
    vocab = Vocab.load(inputs / "tokens")

    def tokens_seen(setting) -> int:
        built = RetrievalAugmentedSequences(docs, neighbors, docs, vocab, setting, 384, 3)
        samples = setting.train.steps * setting.train.micro_batch_size
        per_step = step_samples(setting.train, 1) if setting.train.length_grouping else None
        return sum(
            sum(w > 0 for w in train_sample(built, n, 3, per_step).weights) for n in range(samples)
        )

    assert tokens_seen(baseline) == pytest.approx(tokens_seen(config), rel=0.02)


def test_zero3_exports_whole_weights(inputs, tmp_path):
    run(command(inputs, tmp_path, params_file(tmp_path, steps=2, zero_stage=3, optimizer="adamw")))
    model, vocab, _, _ = load_decoder(tmp_path / "model")  # shapes check out on load
    assert model.shape.vocab_size == vocab.size
    assert any(t.abs().sum() > 0 for t in model.state_dict().values())


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(inputs, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for folder in (straight, killed):
        folder.mkdir()
    run(command(inputs, straight, params_file(straight, steps=12)))
    params = params_file(killed, steps=12)
    proc = subprocess.Popen(
        command(inputs, killed, params),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    scratch = killed / "scratch"
    # DeepSpeed writes `latest` after the tag folder is complete: wait for the step-4 checkpoint
    # to be whole (killing while `step4/` is still being written resumes from step 2, correctly)
    while time.time() < deadline and not any(
        int(f.read_text().strip().removeprefix("step") or 0) >= 4 for f in scratch.glob("*/latest")
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()  # nothing exported by the killed run
    proc = run(command(inputs, killed, params))
    resumed = (killed / "live/plots/metrics/resumed_from_step.tsv").read_text().split()
    assert int(float(resumed[-1])) >= 4  # continued from a checkpoint, not from scratch
    assert f"pretrain: resumed from step {int(float(resumed[-1]))}/12" in proc.stderr
    a, b = weights(straight), weights(killed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_torn_latest_pointer_and_half_written_checkpoint_fall_back_to_an_older_one(
    inputs, tmp_path
):
    straight, torn = tmp_path / "straight", tmp_path / "torn"
    for folder in (straight, torn):
        folder.mkdir()
        run(command(inputs, folder, params_file(folder)))  # 8 steps, a checkpoint every 2
    scratch = next((torn / "scratch").iterdir())
    assert sorted(p.name for p in scratch.glob("step*")) == ["step6", "step8"]  # pruned to 2
    (scratch / "latest").write_text("")  # torn pointer
    states = next((scratch / "step8").glob("*model_states.pt"))
    states.write_bytes(states.read_bytes()[:100])  # half-written newest checkpoint
    shutil.rmtree(torn / "model")
    proc = run(command(inputs, torn, params_file(torn)))
    assert "checkpoint" in proc.stderr and "step8 is unreadable" in proc.stderr
    assert "pretrain: resumed from step 6/8" in proc.stderr
    a, b = weights(straight), weights(torn)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_run_key_changes_with_params_inputs_and_code(inputs, tmp_path):
    base = PretrainConfig()
    folders = (inputs / "tokens", inputs / "retrieval")
    code = (tmp_path / "entry.py",)
    code[0].write_text("import cm3leon.training.pretraining\n")
    key = run_key(base, 1, folders, code)
    assert key == run_key(base, 1, folders, code)
    assert key != run_key(base, 2, folders, code)
    assert key != run_key(PretrainConfig(retrieval_k_max=1), 1, folders, code)
    copy = tmp_path / "retrieval"
    shutil.copytree(inputs / "retrieval", copy)
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text() + " ")
    assert key != run_key(base, 1, (inputs / "tokens", copy), code)
    code[0].write_text("import cm3leon.training.pretraining  # edited\n")
    assert key != run_key(base, 1, folders, code)


def test_a_code_change_retrains_instead_of_reexporting_the_old_run(inputs, tmp_path):
    # A copy of the stage script stands in for the stage's code: editing it is a code change
    # (the library's own files are in the key the same way, through the import closure).
    stages = tmp_path / "stages"
    shutil.copytree(ROOT / "stages", stages)
    params = params_file(tmp_path, steps=4)
    run(command(inputs, tmp_path, params, script=stages / "pretrain.py"))
    first = load_decoder(tmp_path / "model")[2]["run_key"]
    run(command(inputs, tmp_path, params, script=stages / "pretrain.py"))  # unchanged: resumes
    assert load_decoder(tmp_path / "model")[2]["run_key"] == first
    resumed = tmp_path / "live/plots/metrics/resumed_from_step.tsv"
    assert resumed.is_file()
    resumed.unlink()
    script = stages / "pretrain.py"
    script.write_text(script.read_text() + "\n# a code change\n")
    run(command(inputs, tmp_path, params, script=script))
    assert load_decoder(tmp_path / "model")[2]["run_key"] != first
    assert not resumed.is_file()  # trained from step 0 under a new key
    assert len(list((tmp_path / "scratch").iterdir())) == 2


@pytest.mark.parametrize(("optimizer", "zero_stage"), [("adamw", 2), ("muon", 0)])
def test_two_processes_match_one_at_the_same_global_batch(inputs, tmp_path, optimizer, zero_stage):
    """ZeRO-2 partitions AdamW's state; Muon (ZeRO 0) orthogonalizes the all-reduced gradient
    on every rank alike."""
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
    train = {"zero_stage": zero_stage, "optimizer": optimizer}
    run(command(inputs, one, params_file(one, micro_batch_size=8, **train)))
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29731",
    ]
    run(command(inputs, two, params_file(two, micro_batch_size=4, **train), launcher))
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 0.02 * abs(x), (a, b)
