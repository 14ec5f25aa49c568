"""The user's own task files (data.tasks): each format read into its task table, every bad
row named, the prepare stage applying data.on_invalid to them with the documents' rows."""

import json

import numpy as np
import pytest
from PIL import Image

from cm3leon.config import CocoConfig, ConfigError, DataConfig, TaskFilesConfig
from cm3leon.data.corpus import CorpusRecord, read_manifest, read_quarantine, read_task_table
from cm3leon.data.importers import DatasetError, InvalidRowsError, load_image
from cm3leon.data.prepare import prepare_corpus
from cm3leon.data.task_files import load_task_files


def picture(path, color=(200, 30, 30), size=(40, 30)):
    pixels = np.full((size[1], size[0], 3), 90, np.uint8)
    pixels[8:20, 12:26] = color
    Image.fromarray(pixels).save(path)
    return path


def records(tmp_path, count=3):
    """Documents ``coco-1`` .. ``coco-N`` whose source paths are ``pN.png``."""
    out = []
    for i in range(1, count + 1):
        path = picture(tmp_path / f"p{i}.png", color=(40 * i, 30, 30))
        out.append(
            CorpusRecord(
                id=f"coco-{i}",
                split="",
                caption=f"picture {i}",
                captions=(f"picture {i}",),
                image=load_image(path, 32),
                source="coco",
                source_path=f"p{i}.png",
            )
        )
    return out


def test_vqa_v2_pair_keeps_ten_answers_and_names_bad_rows(tmp_path):
    questions = {
        "questions": [
            {"question_id": 10, "image_id": 1, "question": "what color?"},
            {"question_id": 11, "image_id": "coco-2", "question": "how many?"},
            {"question_id": 12, "image_id": 99, "question": "where?"},  # unknown image
            {"question_id": 13, "image_id": 3, "question": "  "},  # no annotation, no text
        ]
    }
    ten = [{"answer": a} for a in ["red"] * 7 + ["dark red"] * 3]
    annotations = {
        "annotations": [
            {"question_id": 10, "answers": ten, "multiple_choice_answer": "red"},
            {"question_id": 11, "answers": [{"answer": "2"}] * 10, "multiple_choice_answer": "2"},
            {"question_id": 12, "answers": ten, "multiple_choice_answer": "red"},
            {"question_id": 77, "answers": ten, "multiple_choice_answer": "red"},  # orphan
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    config = TaskFilesConfig(vqa=str(tmp_path / "q.json"), vqa_annotations=str(tmp_path / "a.json"))
    result = load_task_files(config, records(tmp_path), 32)
    rows = result.tables["vqa"]
    assert [(r["image_id"], r["question"], r["answer"]) for r in rows] == [
        ("coco-1", "what color?", "red"),
        ("coco-2", "how many?", "2"),
    ]
    assert rows[0]["answers"] == ["red"] * 7 + ["dark red"] * 3
    problems = {r.row: r.reason for r in result.invalid}
    assert set(problems) == {"questions[2]", "questions[3]", "annotations[3]"}
    assert "image_id '99' is not a document" in problems["questions[2]"]
    assert "question" in problems["questions[3]"] and "no annotation" in problems["questions[3]"]
    assert "question_id '77' is not in" in problems["annotations[3]"]


def test_vqa_manifest_by_path_or_id_with_one_or_many_answers(tmp_path):
    (tmp_path / "vqa.csv").write_text(
        "image,image_id,question,answer,answers\n"
        "p1.png,,what color?,red,\n"
        ',coco-2,what color?,,"[""green"", ""olive""]"\n'
        "p9.png,,what color?,red,\n"  # not a document
        "p3.png,,,red,\n"  # no question
        'p3.png,,what?,,"[""ok"", 3]"\n'  # answers must be text
    )
    result = load_task_files(TaskFilesConfig(vqa=str(tmp_path / "vqa.csv")), records(tmp_path), 32)
    rows = result.tables["vqa"]
    assert [(r["image_id"], r["answer"], r["answers"]) for r in rows] == [
        ("coco-1", "red", ["red"]),
        ("coco-2", "green", ["green", "olive"]),
    ]
    assert [(r.row, r.path) for r in result.invalid] == [
        ("3", "p9.png"),
        ("4", "p3.png"),
        ("5", "p3.png"),
    ]
    assert "question" in result.invalid[1].reason
    assert "answers must all be non-empty text" in result.invalid[2].reason


def test_a_manifest_without_its_columns_is_refused_by_name(tmp_path):
    (tmp_path / "edit.csv").write_text("image,instruction\np1.png,make it blue\n")
    config = TaskFilesConfig(editing=str(tmp_path / "edit.csv"))
    with pytest.raises(DatasetError, match=r"edit\.csv: missing required column target"):
        load_task_files(config, records(tmp_path), 32)


def test_editing_targets_and_segmentation_masks_share_the_images_crop(tmp_path):
    picture(tmp_path / "t1.png", color=(20, 20, 220))
    mask = np.zeros((30, 40), np.uint8)
    mask[8:20, 12:26] = 255
    Image.fromarray(mask).save(tmp_path / "m1.png")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "empty.png")
    (tmp_path / "edit.csv").write_text(
        "image,instruction,target\np1.png,make it blue,t1.png\np2.png,make it blue,gone.png\n"
    )
    (tmp_path / "seg.csv").write_text(
        "image,instruction,mask\np1.png,segment the box,m1.png\np2.png,segment it,empty.png\n"
    )
    config = TaskFilesConfig(
        editing=str(tmp_path / "edit.csv"), segmentation=str(tmp_path / "seg.csv")
    )
    result = load_task_files(config, records(tmp_path), 32)
    (edit,) = result.tables["edits"]
    target = np.frombuffer(edit["target_image"], np.uint8).reshape(32, 32, 3)
    assert np.array_equal(target, load_image(tmp_path / "t1.png", 32))
    (seg,) = result.tables["segmentation"]
    stored = np.frombuffer(seg["mask"], np.uint8).reshape(32, 32)
    # the mask covers exactly where the (resized, cropped) document image shows the box
    image = load_image(tmp_path / "p1.png", 32).astype(int)
    box = np.abs(image - 90).max(axis=2) > 25  # the box differs from the grey background
    assert set(np.unique(stored)) == {0, 255}
    assert np.mean((stored == 255) == box) > 0.95
    reasons = sorted(f"{r.file.rsplit('/', 1)[-1]}:{r.row}: {r.reason}" for r in result.invalid)
    assert reasons[0].startswith("edit.csv:2: target: image file not found")
    assert (
        reasons[1] == "seg.csv:2: mask: the mask is empty after resizing to the corpus image size"
    )


def test_grounding_boxes_map_into_the_cropped_frame_largest_first(tmp_path):
    instances = {
        "images": [
            {"id": 1, "file_name": "p1.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "p2.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "p3.png", "width": 40, "height": 30},  # no boxes: no row
        ],
        "annotations": [
            {"image_id": 1, "category_id": 5, "bbox": [10, 5, 6, 8]},
            {"image_id": 1, "category_id": 6, "bbox": [20, 10, 15, 15]},
            {"image_id": 1, "category_id": 5, "bbox": [0, 0, 2, 2]},  # cropped away
            {"image_id": 2, "category_id": 9, "bbox": [1, 1, 5, 5]},  # unknown category
            {"image_id": 2, "category_id": 5, "bbox": [1, 1, 0, 5]},  # empty box
        ],
        "categories": [{"id": 5, "name": "cup"}, {"id": 6, "name": "dog"}],
    }
    (tmp_path / "inst.json").write_text(json.dumps(instances))
    config = TaskFilesConfig(grounding=str(tmp_path / "inst.json"), grounding_max_boxes=4)
    result = load_task_files(config, records(tmp_path), 32)
    # 40x30 -> 43x32, 5 columns cropped from the left: x' = x * 43/40 - 5, y' = y * 32/30
    assert result.tables["grounding"] == [
        {
            "image_id": "coco-1",
            "prompt": "a dog in box (16, 10, 32, 27) and a cup in box (5, 5, 13, 14)",
            "objects": None,
        }
    ]
    assert [r.row for r in result.invalid] == ["annotations[3]", "annotations[4]"]
    assert "1 boxes left out" in result.notes[0]
    one = load_task_files(
        TaskFilesConfig(grounding=str(tmp_path / "inst.json"), grounding_max_boxes=1),
        records(tmp_path),
        32,
    )
    assert one.tables["grounding"][0]["prompt"] == "a dog in box (16, 10, 32, 27)"


def coco_project(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    images, annotations = [], []
    for i in range(1, 21):
        picture(raw / f"p{i}.png", color=(10 * i, 200 - 5 * i, 30))
        images.append({"id": i, "file_name": f"p{i}.png"})
        annotations.append({"id": i, "image_id": i, "caption": f"picture number {i}"})
    (raw / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (raw / "vqa.csv").write_text(
        "image,question,answer\n"
        + "".join(f"p{i}.png,which number?,{i}\n" for i in range(1, 21))
        + "p99.png,which number?,99\n"
    )
    return raw


def test_prepare_applies_on_invalid_to_task_rows_with_the_documents(tmp_path):
    raw = coco_project(tmp_path)
    coco = CocoConfig(annotations=str(raw / "captions.json"), images=str(raw))
    tasks = TaskFilesConfig(vqa=str(raw / "vqa.csv"))
    config = DataConfig(source="coco", coco=coco, tasks=tasks)
    with pytest.raises(InvalidRowsError, match=r"vqa\.csv:21: p99\.png: image 'p99\.png' is not"):
        prepare_corpus(config, 0, tmp_path / "corpus", tracked=tmp_path)
    assert not (tmp_path / "corpus").exists()
    config = DataConfig(source="coco", coco=coco, tasks=tasks, on_invalid="quarantine")
    manifest = prepare_corpus(config, 0, tmp_path / "corpus", tracked=tmp_path)
    assert read_manifest(tmp_path / "corpus")["tasks"]["vqa"] == 20 == manifest["tasks"]["vqa"]
    table = read_task_table(tmp_path / "corpus", "vqa")
    assert table.column("answers").to_pylist()[:2] == [["1"], ["2"]]
    assert read_quarantine(tmp_path / "corpus").column("row").to_pylist() == ["21"]


def test_task_files_are_user_data_only_and_inside_the_tracked_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.tasks\.vqa: is for user data"):
        DataConfig(tasks=TaskFilesConfig(vqa="data/raw/vqa.csv"))
    with pytest.raises(ConfigError, match=r"data\.tasks\.vqa_annotations: is required"):
        TaskFilesConfig(vqa="data/raw/questions.json")
    raw = coco_project(tmp_path)
    coco = CocoConfig(annotations=str(raw / "captions.json"), images=str(raw))
    config = DataConfig(source="coco", coco=coco, tasks=TaskFilesConfig(vqa="/elsewhere/vqa.csv"))
    with pytest.raises(ValueError, match=r"data\.tasks\.vqa: /elsewhere/vqa\.csv is outside"):
        prepare_corpus(config, 0, tmp_path / "corpus", tracked=tmp_path)
