"""``cm3leon verify`` (cm3leon/lineage/verify.py): rerun in a clone, compare with dvc.lock."""

import json

import yaml

from cm3leon.lineage import verify as ver

from conftest import dvc, run

IDENTITY = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def lock(**outs):
    return {stage: {"outs": [{"path": p, "md5": m} for p, m in o]} for stage, o in outs.items()}


def test_outputs_are_compared_in_order_and_timing_is_not_a_difference():
    reference = lock(
        tokenize=[("models/vq", "a"), ("reports/tokenize/metrics.json", "m1")],
        index=[("data/retrieval", "r"), ("reports/index/metrics.json", "i1")],
    )
    rerun = lock(
        tokenize=[("models/vq", "a"), ("reports/tokenize/metrics.json", "m2")],
        index=[("data/retrieval", "r2"), ("reports/index/metrics.json", "i2"), ("new", "n")],
    )
    old = {
        "reports/tokenize/metrics.json": {
            "psnr_db": 32.8,
            "stage_seconds": 290.4,
            "val/text_loss": float("nan"),  # no text targets: NaN in every run
        },
        "reports/index/metrics.json": {"recall": {"at_1": 0.97, "images_per_second": 5.0}},
    }
    new = {
        "reports/tokenize/metrics.json": {
            "psnr_db": 32.8,
            "stage_seconds": 243.0,
            "val/text_loss": float("nan"),
        },
        "reports/index/metrics.json": {"recall": {"at_1": 0.96, "images_per_second": 9.0}},
    }

    def text(files):  # a DVC-cached output (data/retrieval) is not readable as text: None
        return lambda p: {"": json.dumps(files[p])} if p in files else None

    rows = ver.compare_locks(reference, rerun, text(old), text(new))
    assert [(r["path"], r["verdict"]) for r in rows] == [
        ("models/vq", "identical"),
        ("reports/tokenize/metrics.json", "same result"),  # only the stage's seconds moved
        ("data/retrieval", "differs"),
        ("reports/index/metrics.json", "differs"),  # recall moved, not only throughput
        ("new", "not in reference"),
    ]
    assert rows[2]["reference"] == "r" and rows[2]["rerun"] == "r2"


def test_curves_of_the_machines_speed_are_not_a_difference():
    curves = {"train/loss.tsv": "step\tloss\n10\t2.5\n", "train/mfu.tsv": "step\tmfu\n10\t0.4\n"}
    faster = {**curves, "train/mfu.tsv": "step\tmfu\n10\t0.7\n"}
    assert ver.same_result(curves, faster)
    assert not ver.same_result(curves, {**faster, "train/loss.tsv": "step\tloss\n10\t2.6\n"})
    assert not ver.same_result(curves, {"train/mfu.tsv": curves["train/mfu.tsv"]})  # no loss
    assert ver.same_result(curves, {"train/loss.tsv": curves["train/loss.tsv"]})  # timing only


def test_across_architectures_the_metrics_decide_within_a_tolerance():
    reference = lock(pretrain=[("models/pretrain", "a"), ("reports/pretrain/metrics.json", "m")])
    rerun = lock(pretrain=[("models/pretrain", "b"), ("reports/pretrain/metrics.json", "n")])
    old = {"val/loss": 1.219, "stage_seconds": 543.0}

    def rows(new, tolerance):
        found = ver.compare_locks(
            reference,
            rerun,
            lambda p: {"": json.dumps(old)} if p.endswith(".json") else None,
            lambda p: {"": json.dumps(new)} if p.endswith(".json") else None,
            tolerance,
        )
        return [r["verdict"] for r in found]

    close = {"val/loss": 1.225, "stage_seconds": 301.0}  # 0.5% apart
    assert rows(close, 0.0) == ["differs", "differs"]  # bytes: the default
    assert rows(close, 0.01) == ["hash differs", "within tolerance"]
    assert rows({"val/loss": 1.3, "stage_seconds": 301.0}, 0.01) == ["hash differs", "differs"]
    curve = {"loss.tsv": "step\tloss\n10\t2.50\n"}
    assert ver.same_result(curve, {"loss.tsv": "step\tloss\n10\t2.51\n"}, 0.01)
    assert not ver.same_result(curve, {"loss.tsv": "step\tloss\n10\t2.51\n"})


def test_environment_differences_are_named_key_by_key():
    committed = {"cpu_capability": "AVX2", "threads": 2, "numerics": {"mode": "reproducible"}}
    here = {"cpu_capability": "AVX512", "threads": 2, "numerics": {"mode": "fast"}}
    assert ver.environment_diff(committed, here) == {
        "cpu_capability": ("AVX2", "AVX512"),
        "numerics.mode": ("reproducible", "fast"),
    }
    assert ver.environment_diff(committed, committed) == {}


def test_a_clone_reproduces_the_committed_lock_and_a_changed_hash_is_named(make_project):
    root = make_project()
    dvc("repro", "tokenize", cwd=root)
    run(["git", "add", "-A"], cwd=root)
    run(["git", *IDENTITY, "commit", "-qm", "run"], cwd=root)

    result = ver.verify(root, "tokenize")
    assert result["reproduced"], ver.format_verify(result)
    verdicts = {row["path"]: row["verdict"] for row in result["outputs"]}
    assert (
        verdicts["data/corpus"] == verdicts["models/vq"] == verdicts["data/tokens"] == ("identical")
    )
    assert verdicts["reports/tokenize/metrics.json"] in ("identical", "same result")
    assert set(verdicts) >= {"reports/validation/data_docs", "models/text_tokenizer"}

    # A committed hash the rerun cannot give: the report names it and where the run parted.
    committed = yaml.safe_load((root / "dvc.lock").read_text())
    for out in committed["stages"]["validate"]["outs"]:
        if out["path"] == "reports/validation/results.json":
            out["md5"] = "0" * 32
    (root / "dvc.lock").write_text(yaml.safe_dump(committed, sort_keys=False))
    run(["git", *IDENTITY, "commit", "-qam", "tampered lock"], cwd=root)
    result = ver.verify(root, "validate")
    assert not result["reproduced"]
    first = result["first_difference"]
    assert (first["stage"], first["path"]) == ("validate", "reports/validation/results.json")
    text = ver.format_verify(result)
    assert "NOT reproduced" in text
    assert "first difference: reports/validation/results.json (stage validate)" in text
