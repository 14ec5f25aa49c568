"""End to end through real DVC: the DAG runs, reruns are no-ops, same seed gives the same
corpus hashes in dvc.lock, and a corrupted corpus fails `validate` and stops the DAG."""

import json
import time

import yaml

from conftest import add_downstream_stage, corrupt_corpus, dvc


def lock_outs(root, stage):
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}


def test_repro_runs_the_dag_then_is_a_no_op(make_project):
    root = make_project()
    first = dvc("repro", cwd=root)
    assert "Running stage 'prepare'" in first.stdout
    assert "Running stage 'validate'" in first.stdout
    assert "Running stage 'tokenize'" in first.stdout
    tokenize_metrics = json.loads((root / "reports/tokenize/metrics.json").read_text())
    assert tokenize_metrics["images"] > 0 and "psnr_db" in tokenize_metrics
    assert (root / "reports/tokenize/reconstructions.png").is_file()
    assert (root / "reports/tokenize/live/plots/metrics/vq/loss.tsv").is_file()
    index_metrics = json.loads((root / "reports/index/metrics.json").read_text())
    assert index_metrics["bank_size"] > 0 and "text_to_image_recall@5" in index_metrics
    pretrain_metrics = json.loads((root / "reports/pretrain/metrics.json").read_text())
    assert pretrain_metrics["val/loss"] > 0 and pretrain_metrics["parameters"] > 0
    assert (root / "models/pretrain/model.safetensors").is_file()
    sft_metrics = json.loads((root / "reports/sft/metrics.json").read_text())
    for task in ("text_to_image", "captioning", "vqa", "editing", "grounding", "segmentation"):
        assert sft_metrics[f"val_{task}/loss"] > 0 and f"pretrain_val_{task}/loss" in sft_metrics
    assert (root / "models/sft/model.safetensors").is_file()
    assert (root / "reports/validation/data_docs/index.html").is_file()
    metrics = json.loads((root / "reports/validation/metrics.json").read_text())
    assert metrics["success"] is True and metrics["expectations_failed"] == 0
    start = time.perf_counter()
    second = dvc("repro", cwd=root)
    elapsed = time.perf_counter() - start
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
    assert elapsed < 30  # generous bound for a loaded CI machine; the README quotes measured time


def test_same_seed_gives_identical_corpus_hashes(make_project):
    a, b, c = make_project(), make_project(), make_project({"base": {"seed": 99}})
    for root in (a, b):
        dvc("repro", cwd=root)
    dvc("repro", "prepare", cwd=c)
    assert lock_outs(a, "prepare") == lock_outs(b, "prepare")
    assert lock_outs(a, "prepare") != lock_outs(c, "prepare")
    # the validation results too (GE's run ids and clock times are left out of results.json)
    results = "reports/validation/results.json"
    assert lock_outs(a, "validate")[results] == lock_outs(b, "validate")[results]
    # and the tokenizers and tokens (metrics.json differs: it records the stage's wall time)
    artifacts = ("models/vq", "models/text_tokenizer", "data/tokens")
    assert [lock_outs(a, "tokenize")[p] for p in artifacts] == [
        lock_outs(b, "tokenize")[p] for p in artifacts
    ]
    assert lock_outs(a, "index")["data/retrieval"] == lock_outs(b, "index")["data/retrieval"]
    assert (
        lock_outs(a, "pretrain")["models/pretrain"] == lock_outs(b, "pretrain")["models/pretrain"]
    )


def test_corrupted_corpus_fails_validate_and_stops_the_dag(make_project):
    root = make_project()
    add_downstream_stage(root)
    dvc("repro", "prepare", cwd=root)
    corrupt_corpus(root)
    proc = dvc("repro", cwd=root, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "validate: FAILED" in output
    assert "caption" in output
    assert not (root / "downstream.txt").exists()
    stages_run = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "downstream" not in stages_run and "tokenize" not in stages_run
