"""The whole DAG on data that is not ShapeWorld, through the Prefect flow and real DVC: a tiny
COCO-captions dataset of striped and checkered pictures drawn here, at sizes other than the
model's. No stage may need the ShapeWorld judge: evaluate reports the generic metrics, says
which tasks it could not score, the report renders, and the trained models answer the CLI."""

import json
import math
import sys

import numpy as np
from PIL import Image
from test_pipeline_flow import load_flow_module

from conftest import dvc, run

CLI = [sys.executable, "-m", "cm3leon.cli"]
TABLE_TASKS_BY_NAME = ("vqa", "editing", "grounding", "segmentation")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "gold": (230, 190, 20),
}
PATTERNS = ("horizontal stripes", "vertical stripes", "a checkerboard", "a single dot")


def pattern_mask(pattern: str, variant: int) -> np.ndarray:
    """Where a 40x30 picture of ``pattern`` (shifted by ``variant``) is colored."""
    y, x = np.mgrid[0:30, 0:40]
    period = 6 + variant % 3
    return {
        "horizontal stripes": (y + variant) % period < period // 2,
        "vertical stripes": (x + variant) % period < period // 2,
        "a checkerboard": ((x // period) + (y // period)) % 2 == 0,
        "a single dot": (x - 12 - 3 * variant) ** 2 + (y - 15) ** 2 < 40,
    }[pattern]


def draw(pattern: str, color: tuple[int, int, int], variant: int) -> Image.Image:
    """A 40x30 picture: ``pattern`` in ``color`` on a grey background, shifted by ``variant``."""
    pixels = np.full((30, 40, 3), 128, np.uint8)
    pixels[pattern_mask(pattern, variant)] = color
    return Image.fromarray(pixels)


def write_dataset(root) -> None:
    """``data/raw/own``: COCO captions JSON and 64 images with two captions each."""
    folder = root / "data/raw/own/images"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i, (pattern, color, variant) in enumerate(
        (p, c, v) for p in PATTERNS for c in COLORS for v in range(4)
    ):
        name = f"pic{i:03d}.png"
        draw(pattern, COLORS[color], variant).save(folder / name)
        images.append({"id": 100 + i, "file_name": name})
        for caption in (f"{color} {pattern}", f"a picture of {pattern} in {color}"):
            annotations.append({"id": len(annotations), "image_id": 100 + i, "caption": caption})
    (root / "data/raw/own/captions.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )


def write_task_files(root) -> None:
    """The four task files, in the formats users have: a VQA manifest (image, question,
    answers), editing (image, instruction, target) and segmentation (image, instruction, mask)
    manifests, and COCO instances boxes (each picture's pattern) for grounding. Task rows name
    their picture as the captions file does; targets and masks are relative to the manifest."""
    own = root / "data/raw/own"
    (own / "targets").mkdir()
    vqa, edits, masks, boxes, images = [], [], [], [], []
    for i, (pattern, color, variant) in enumerate(
        (p, c, v) for p in PATTERNS for c in COLORS for v in range(4)
    ):
        name = f"pic{i:03d}.png"
        vqa.append({"image": name, "question": "what color is it?", "answers": [color, color]})
        vqa.append({"image": name, "question": "what is drawn?", "answer": pattern})
        other = list(COLORS)[(list(COLORS).index(color) + 1) % len(COLORS)]
        draw(pattern, COLORS[other], variant).save(own / "targets" / name)
        edits.append(f"{name},make it {other},targets/{name}")
        mask = pattern_mask(pattern, variant)
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(own / "targets" / f"m{name}")
        masks.append(f"{name},segment the {pattern},targets/m{name}")
        images.append({"id": 100 + i, "file_name": name, "width": 40, "height": 30})
        ys, xs = np.nonzero(mask)
        box = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
        category = 1 + PATTERNS.index(pattern)
        boxes.append({"id": i, "image_id": 100 + i, "category_id": category, "bbox": box})
    (own / "vqa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in vqa))
    (own / "edits.csv").write_text("image,instruction,target\n" + "\n".join(edits) + "\n")
    (own / "masks.csv").write_text("image,instruction,mask\n" + "\n".join(masks) + "\n")
    categories = [{"id": 1 + k, "name": p.removeprefix("a ")} for k, p in enumerate(PATTERNS)]
    instances = {"images": images, "annotations": boxes, "categories": categories}
    (own / "instances.json").write_text(json.dumps(instances))


def test_the_flow_runs_every_stage_on_user_data(make_project, prefect_server):
    root = make_project(
        {
            "data": {
                "source": "coco",
                "coco": {
                    "annotations": "data/raw/own/captions.json",
                    "images": "data/raw/own/images",
                },
                "tasks": {
                    "vqa": "data/raw/own/vqa.jsonl",
                    "editing": "data/raw/own/edits.csv",
                    "segmentation": "data/raw/own/masks.csv",
                    "grounding": "data/raw/own/instances.json",
                },
            },
            # 64 images: a test split of ~6 documents is all evaluate has
            "evaluate": {"studies": {"prompts": 4}},
        }
    )
    write_dataset(root)
    write_task_files(root)
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    run(["git", "add", "-A"], cwd=root)
    run(["git", *identity, "commit", "-qm", "own data"], cwd=root)

    state = load_flow_module().pipeline(project=str(root), return_state=True)
    assert state.is_completed()
    corpus = json.loads((root / "data/corpus/manifest.json").read_text())
    assert corpus["source"] == "coco" and "judge" not in corpus  # user data has no judge

    assert corpus["tasks"] == {"vqa": 128, "edits": 64, "grounding": 64, "segmentation": 64}

    sft = json.loads((root / "reports/sft/metrics.json").read_text())
    assert sft["tasks_not_trained"] == []  # every task has the user's examples
    metrics = json.loads((root / "reports/eval_metrics.json").read_text())
    assert metrics["judge"] is None
    assert "skipped" not in metrics  # every task has test rows and a metric
    for model in ("pretrain", "sft"):
        scored = metrics[model]
        assert set(scored) == {"text_to_image", "captioning", *TABLE_TASKS_BY_NAME}
        assert 0 <= scored["vqa"]["accuracy"] <= 1 and 0 <= scored["segmentation"]["mean_iou"] <= 1
        for task in ("editing", "grounding"):  # no judge: closeness to the true image
            for key in (
                "target_similarity_dual_encoder",
                "baseline_target_similarity_dual_encoder",
            ):
                assert -1 <= scored[task][key] <= 1, (task, key)
            assert 0 <= scored[task]["target_pixel_mse"] <= 1
        t2i = metrics[model]["text_to_image"]
        assert "accuracy" not in t2i  # nothing exact without a judge
        for key in ("r_precision", "real_r_precision"):
            low, high = t2i[f"{key}_ci95"]
            assert 0 <= low <= t2i[key] <= high <= 1
        assert t2i["r_precision_chance"] == 1 / t2i["r_precision_candidates"]
        for key in ("fid_dual_encoder", "real_fid_dual_encoder", "clip_score_dual_encoder"):
            assert math.isfinite(t2i[key]) and t2i[key] > -1e-6  # FID: >= 0 up to rounding
        captioning = metrics[model]["captioning"]
        assert math.isfinite(captioning["cider_d"]) and captioning["references_per_image"] == 2
        assert "attribute_exact_match" not in captioning
    for model in ("pretrain", "sft"):  # infilling is scored without a judge too
        infilling = metrics["infilling"][model]
        assert "accuracy" not in infilling
        for key in ("region_mse", "spliced_region_mse", "similarity_dual_encoder"):
            assert math.isfinite(infilling[key]), key
    best = metrics["best_text_to_image"]
    assert best["metric"] == "r_precision" and 0 <= best["r_precision"] <= 1
    cfg = json.loads((root / "reports/eval/tables/cfg_weight.json").read_text())
    assert all("r_precision_low" in row and "accuracy" not in row for row in cfg)

    page = (root / "reports/index.html").read_text()
    assert '<table id="metrics">' in page and "r_precision" in page
    assert "not scored" not in page
    assert "text_to_image, real test images" in page
    assert "infilling, spliced baseline" in page
    assert "editing, baseline: input image unchanged" in page

    out = root / "generated.png"
    run([*CLI, "generate", "blue vertical stripes", "-o", str(out)], cwd=root)
    assert Image.open(out).size == (32, 32)
    for args in (["caption", str(out)], ["ask", str(out), "what color is it?"]):
        answer = json.loads(run([*CLI, *args, "--json"], cwd=root).stdout)["output"]
        assert isinstance(answer, str)
    assert "up to date" in dvc("status", cwd=root).stdout
