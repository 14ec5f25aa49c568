"""End to end through real DVC: the DAG runs, reruns are no-ops, same seed gives the same
corpus hashes in dvc.lock, and a corrupted corpus fails `validate` and stops the DAG."""

import csv
import json
import re
import sys

import pytest
import yaml
from PIL import Image

from conftest import add_downstream_stage, corrupt_corpus, dvc, run

CLI = [sys.executable, "-m", "cm3leon.cli"]


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
    check_evaluate_outputs(root)
    check_model_commands(root)
    check_lineage(root)
    page = (root / "reports/index.html").read_text()
    assert '<table id="metrics">' in page and ">Lineage of each model</h2>" in page
    assert "stage &#x27;sft&#x27; -&gt; models/sft" in page  # the models' lineage is in the report
    # each stage's record once, linked from its DAG node, which shows its output's hash
    assert page.count('id="stage-sft"') == 1 and '<a href="#stage-sft">' in page
    sft_md5 = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["sft"]["outs"][0]["md5"]
    assert f"md5 {sft_md5[:8]}" in page
    # retrieved documents shown as the corpus images that were in the prompt, with id and score
    docs = re.findall(r'<span class="doc"><img class="thumb" alt="([^"]+)"', page)
    assert docs and all(d.startswith("sw-") for d in docs)
    # the procedure's steps are the run's (its dvclive summary), not the params'
    assert "steps run" in page and "(params)" not in page
    assert (root / "reports/validation/data_docs/index.html").is_file()
    metrics = json.loads((root / "reports/validation/metrics.json").read_text())
    assert metrics["success"] is True and metrics["expectations_failed"] == 0
    second = dvc("repro", cwd=root)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout


def check_evaluate_outputs(root):
    """The evaluate stage's folder: metrics per model and task, study tables, files."""
    metrics = json.loads((root / "reports/eval_metrics.json").read_text())
    for model in ("pretrain", "sft"):
        tasks = metrics[model]
        assert set(tasks) == {
            "text_to_image",
            "captioning",
            "vqa",
            "editing",
            "grounding",
            "segmentation",
        }
        assert 0 <= tasks["text_to_image"]["accuracy"] <= 1
        assert tasks["text_to_image"]["examples"] == 6
        # every generator re-ranked alike: the SFT model captions, params.yaml's weight
        assert metrics["rerank"][model] == {"captioner": "sft", "caption_weight": 0.5}
        assert "fid_dual_encoder" in tasks["text_to_image"]
        assert {"cider_d", "bleu_4", "attribute_exact_match"} <= set(tasks["captioning"])
        assert 0 <= tasks["segmentation"]["mean_iou"] <= 1
        # every headline number carries its 95% interval; images carry why they are wrong
        t2i = tasks["text_to_image"]
        low, high = t2i["accuracy_ci95"]
        assert low <= t2i["accuracy"] <= high and high - low > 0.2  # 6 prompts: wide
        assert {"object_count_accuracy", "objects_right"} <= set(t2i)
        assert any(k.startswith("any_object_right_") for k in t2i)
        assert len(tasks["captioning"]["attribute_exact_match_ci95"]) == 2
        assert len(tasks["segmentation"]["mean_iou_ci95"]) == 2
    assert "text_to_image" in metrics["pretrain_no_retrieval"]
    for model in ("pretrain", "sft"):  # CM3 infilling of the middle image rows, and a baseline
        infilling = metrics["infilling"][model]
        assert infilling["examples"] == 6 and infilling["masked_rows"] == [2, 6]
        for key in ("accuracy", "spliced_accuracy", "region_mse", "similarity_dual_encoder"):
            low, high = infilling[f"{key}_ci95"]
            assert low <= infilling[key] <= high, key
    eval_dir = root / "reports/eval"
    cfg_rows = list(csv.DictReader((eval_dir / "tables/cfg_weight.csv").open()))
    assert all(float(r["accuracy_low"]) <= float(r["accuracy"]) for r in cfg_rows)
    assert [(r["strategy"], float(r["cfg_weight"])) for r in cfg_rows] == [
        ("top_p", 1.0),
        ("top_p", 3.0),
        ("mix", 1.0),
        ("mix", 3.0),
    ]
    # each weight against w = 1 of its strategy, prompt by prompt, with a paired interval
    no_cfg = {r["strategy"]: float(r["accuracy"]) for r in cfg_rows if r["cfg_weight"] == "1.0"}
    for r in cfg_rows:
        gain = float(r["gain_vs_cfg1"])
        assert gain == pytest.approx(float(r["accuracy"]) - no_cfg[r["strategy"]], abs=2e-4)
        assert float(r["gain_vs_cfg1_low"]) <= gain <= float(r["gain_vs_cfg1_high"])
    paired = json.loads((eval_dir / "tables/ra_vs_no_retrieval.json").read_text())
    assert paired[1]["minus_no_retrieval"] == 0.0
    assert paired[0]["minus_no_retrieval"] == pytest.approx(
        paired[0]["accuracy"] - paired[1]["accuracy"], abs=2e-4
    )
    by_task = {
        r["task"]: r for r in json.loads((eval_dir / "tables/pretrain_vs_sft.json").read_text())
    }
    for task in ("text_to_image", "captioning", "vqa"):  # scored right or wrong row by row
        row = by_task[task]
        assert row["sft_minus_pretrain_low"] <= row["sft_minus_pretrain"]
        assert row["sft_minus_pretrain"] == pytest.approx(row["sft"] - row["pretrain"], abs=2e-4)
    assert "sft_minus_pretrain" not in by_task["segmentation"]  # IoU: no paired proportion
    samples = list(csv.DictReader((eval_dir / "tables/samples.csv").open()))
    assert [int(r["samples"]) for r in samples] == [1, 2]
    retrieved = json.loads((eval_dir / "tables/retrieved_docs.json").read_text())
    assert [r["retrieved"] for r in retrieved] == [0, 1] and retrieved[1]["mean_retrieved"] > 0
    for name in ("pretrain_vs_sft", "ra_vs_no_retrieval"):
        assert (eval_dir / "tables" / f"{name}.csv").is_file()
        assert (eval_dir / "plots" / f"{name}.png").is_file()
    manifest = json.loads(
        (eval_dir / "generations/pretrain/text_to_image/manifest.json").read_text()
    )
    assert len(manifest) == 6
    assert all(
        (eval_dir / "generations/pretrain/text_to_image" / m["file"]).is_file() for m in manifest
    )
    assert all(len(m["retrieved"]) >= 1 for m in manifest)  # pretrain generates with retrieval
    # the retrieval study's generations at its most documents name what each prompt retrieved
    study = json.loads((eval_dir / "generations/pretrain/retrieved_docs/manifest.json").read_text())
    assert len(study) == retrieved[1]["examples"] and all(m["retrieved_k"] == 1 for m in study)
    mean_docs = sum(len(m["retrieved"]) for m in study) / len(study)
    assert round(mean_docs, 3) == retrieved[1]["mean_retrieved"]
    assert all(d["id"] and isinstance(d["score"], float) for m in study for d in m["retrieved"])
    captions = json.loads((eval_dir / "predictions/sft_captions.json").read_text())
    assert len(captions) == 6 and set(captions[0]) == {"image_id", "caption"}  # COCO results
    assert (eval_dir / "samples/sft_text_to_image.png").is_file()
    assert (eval_dir / "samples/infilling.png").is_file()


def check_model_commands(root):
    """`cm3leon generate/caption/ask/edit` on the trained tiny model."""
    out = root / "generated.png"
    done = run(
        [*CLI, "generate", "a small red square at the top left", "-o", str(out), "--samples", "2"],
        cwd=root,
    )
    assert out.is_file() and "retrieved from the memory bank:" in done.stdout
    sidecar = json.loads((root / "generated.png.json").read_text())
    assert len(sidecar["retrieved"]) == 2 and sidecar["model_fingerprint"]
    assert sidecar["rerank"]["captioner"].endswith("models/sft")  # the default model itself
    assert sidecar["rerank"]["caption_weight"] == 0.5
    assert len(sidecar["rerank_scores"]) == 2
    big = root / "big.jpg"  # any size and mode is converted
    Image.new("L", (97, 55), 200).save(big)
    for args in (["caption", str(big)], ["ask", str(out), "what color is it?"]):
        done = run([*CLI, *args, "--json"], cwd=root)
        assert isinstance(json.loads(done.stdout)["output"], str)
    edited = root / "edited.png"
    run([*CLI, "edit", str(big), "make it blue", "-o", str(edited), "--retrieved", "0"], cwd=root)
    assert edited.is_file()
    broken = root / "broken.png"
    broken.write_bytes(b"not an image")
    failed = run([*CLI, "caption", str(broken)], cwd=root, check=False)
    assert failed.returncode != 0
    assert "broken.png: cannot decode image" in failed.stderr


def check_lineage(root):
    """`cm3leon lineage` on a generated sample: its retrieved documents, and a graph of every
    upstream stage, each once, whose every hash is the one dvc.lock records, down to the
    source data; the text prints each stage once and stays short; dot and mermaid draw it."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    sample = "reports/eval/generations/pretrain/text_to_image/0000.png"
    record = json.loads(run([*CLI, "lineage", sample, "--json"], cwd=root).stdout)
    assert record["sample"]["retrieved"] and record["sample"]["source"].endswith("manifest.json")
    assert record["git"]["commit"] and "torch" in record["packages"]
    stages = record["stages"]
    assert next(iter(stages)) == "evaluate" and record["artifact"]["stage"] == "evaluate"
    assert set(stages) == {s for s in lock if s != "report"}  # all of them, each once
    for name, node in stages.items():
        entry = lock[name]
        assert node["cmd"] == entry["cmd"]
        outs = {o["path"]: o["md5"] for o in entry["outs"]}
        assert all(outs[o["path"]] == o["md5"] for o in node["outputs"])
        deps = {d["path"]: d["md5"] for d in entry["deps"]}
        for item in node["code"] + node["inputs"]:
            assert deps[item["path"]] == item["md5"]
        assert len(node["code"]) + len(node["inputs"]) == len(deps)
        for item in node["inputs"]:  # each input names its producer, which is in the graph
            assert item["stage"] is None or item["stage"] in stages
    assert [i["stage"] for i in stages["prepare"]["inputs"]] == [None]  # source data
    assert stages["pretrain"]["environment"]["device"] == "cpu"  # from models/pretrain
    text = run([*CLI, "lineage", sample], cwd=root).stdout
    headers = [line for line in text.splitlines() if line.startswith("  stage '")]
    assert len(headers) == len(stages) == len({h.split("'")[1] for h in headers})
    # short: per stage a fixed handful of lines, one per changed param and one per input (the
    # unchanged params stay out), so the length follows from the record, not from the recipe
    budget = 13 + len(record["sample"]["retrieved"])
    budget += sum(7 + len(n["params_changed"]) + len(n["inputs"]) for n in stages.values())
    assert len(text.splitlines()) <= budget, (len(text.splitlines()), budget)
    assert budget < sum(len(n["params"]) for n in stages.values())  # what --all-params prints
    assert text.count("    trained on ") == 3  # pretrain, sft, pretrain_no_retrieval
    dot = run([*CLI, "lineage", sample, "--format", "dot"], cwd=root).stdout
    assert dot.startswith("digraph") and '"prepare" -> "validate" [label="data/corpus"]' in dot
    mermaid = run([*CLI, "lineage", sample, "--format", "mermaid"], cwd=root).stdout
    assert mermaid.startswith("flowchart LR") and "pretrain -->|models/pretrain| sft" in mermaid
    text = run([*CLI, "lineage", "generated.png"], cwd=root).stdout
    assert "retrieved memory-bank documents: 2" in text and "stage 'sft' -> models/sft" in text
    # a `dvc exp` with one changed param: `lineage diff` names exactly that param and the
    # stages it reran, and the lineage shows the new value
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "add", "-A"], cwd=root)
    run(["git", *identity, "commit", "-qm", "first run"], cwd=root)
    dvc("exp", "run", "-S", "evaluate.grid_examples=2", "--name", "grid2", cwd=root)
    diff = json.loads(run([*CLI, "lineage", "diff", "HEAD", "grid2", "--json"], cwd=root).stdout)
    changed = {"evaluate.grid_examples": {"a": 3, "b": 2, "stages": ["evaluate"]}}
    assert diff["params"] == changed, diff["params"]
    assert set(diff["stages"]) == {"evaluate", "report"}, diff["stages"]
    assert diff["stages"]["evaluate"]["params"] == ["evaluate.grid_examples"]
    text = run([*CLI, "lineage", "diff", "HEAD", "grid2"], cwd=root).stdout
    assert "evaluate.grid_examples: 3 -> 2  (read by evaluate)" in text
    assert "stages whose run differs (2): evaluate, report" in text
    record = json.loads(run([*CLI, "lineage", sample, "--json"], cwd=root).stdout)
    assert record["artifact"]["params"]["evaluate.grid_examples"] == 2
    assert record["artifact"]["params_changed"]["evaluate.grid_examples"] == 2
    assert "evaluate.grid_examples = 2" in run([*CLI, "lineage", sample], cwd=root).stdout
    failed = run([*CLI, "lineage", "README.md"], cwd=root, check=False)
    assert failed.returncode != 0 and "not an output of any stage" in failed.stderr


def test_same_seed_gives_identical_corpus_hashes(make_project):
    a, b, c = make_project(), make_project(), make_project({"base": {"seed": 99}})
    for root in (a, b):
        dvc("repro", cwd=root)
    dvc("repro", "prepare", cwd=c)
    assert lock_outs(a, "prepare") == lock_outs(b, "prepare")
    assert lock_outs(a, "prepare") != lock_outs(c, "prepare")
    # every validation output too, Data Docs included (GE's run ids, clock times and element
    # ids are fixed or normalized)
    assert lock_outs(a, "validate") == lock_outs(b, "validate")
    # and the tokenizers and tokens (metrics.json differs: it records the stage's wall time)
    artifacts = ("models/vq", "models/text_tokenizer", "data/tokens")
    assert [lock_outs(a, "tokenize")[p] for p in artifacts] == [
        lock_outs(b, "tokenize")[p] for p in artifacts
    ]
    assert lock_outs(a, "index")["data/retrieval"] == lock_outs(b, "index")["data/retrieval"]
    assert (
        lock_outs(a, "pretrain")["models/pretrain"] == lock_outs(b, "pretrain")["models/pretrain"]
    )
    # and every evaluation output: generations, predictions, tables, plots and grids
    assert lock_outs(a, "evaluate")["reports/eval"] == lock_outs(b, "evaluate")["reports/eval"]


def test_a_corpus_changed_after_validation_is_not_tokenized(make_project):
    """`dvc repro -s tokenize` runs tokenize alone: the gate must check that the corpus is
    the one validate passed, not only that validate passed once."""
    root = make_project()
    dvc("repro", "validate", cwd=root)
    corrupt_corpus(root)  # a caption blanked and committed as prepare's output
    proc = dvc("repro", "-s", "tokenize", cwd=root, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "tokenize: error: data/corpus is not the corpus" in output, output[-2000:]
    assert "reports/validation/metrics.json validated" in output
    assert not (root / "models/vq").exists() and not (root / "data/tokens").exists()


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
