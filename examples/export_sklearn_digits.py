"""Export scikit-learn's handwritten digits as a COCO-captions dataset for `data.source: coco`.

The images are real: the 1,797 8x8 scans of handwritten digits from the UCI "Optical
Recognition of Handwritten Digits" data set (Alpaydin & Kaynak 1998), which scikit-learn ships
inside its package (``sklearn.datasets.load_digits`` reads them from disk; nothing is
downloaded). Each image gets three captions naming its digit, so captioning has several
references per image. Usage (``pip install scikit-learn`` first)::

    python examples/export_sklearn_digits.py data/raw/digits

writes ``data/raw/digits/images/digit-0000.png`` ... (8x8 grey, ink white on black as in the
source), ``data/raw/digits/captions.json`` (COCO ``images`` + ``annotations``) and two task
files in the formats ``data.tasks`` reads: ``vqa.csv`` (two questions per image: which digit,
answered by its word or numeral, and whether it is even) and ``segmentation.csv`` with
``masks/digit-0000.png`` ... (the ink: source intensity >= 8 of 16). Then run the pipeline
with::

    dvc exp run -S data.source=coco -S data.coco.annotations=data/raw/digits/captions.json \\
        -S data.coco.images=data/raw/digits/images -S data.tasks.vqa=data/raw/digits/vqa.csv \\
        -S data.tasks.segmentation=data/raw/digits/segmentation.csv

(``prepare`` resizes every image to ``data.image_size``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def captions(digit: int) -> list[str]:
    word = WORDS[digit]
    return [
        f"a handwritten digit {word}",
        f"the number {digit} written by hand",
        f"a scanned handwritten {word}",
    ]


def export(out_dir: Path) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir = out_dir / "masks"
    masks_dir.mkdir(exist_ok=True)
    images, annotations = [], []
    vqa = [["image", "question", "answers"]]
    segmentation = [["image", "instruction", "mask"]]
    for i, (pixels, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
        name = f"digit-{i:04d}.png"
        grey = np.round(pixels * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
        Image.fromarray(grey).save(images_dir / name)
        Image.fromarray(np.where(pixels >= 8, 255, 0).astype(np.uint8)).save(masks_dir / name)
        images.append({"id": i, "file_name": name, "width": 8, "height": 8})
        for caption in captions(int(digit)):
            annotations.append({"id": len(annotations), "image_id": i, "caption": caption})
        word = WORDS[int(digit)]
        vqa.append([name, "which digit is this?", json.dumps([word, str(int(digit))])])
        vqa.append([name, "is this digit even?", json.dumps(["yes" if digit % 2 == 0 else "no"])])
        segmentation.append([name, "segment the ink of the digit", f"masks/{name}"])
    (out_dir / "captions.json").write_text(
        json.dumps({"images": images, "annotations": annotations}, indent=0) + "\n"
    )
    for file, rows in (("vqa.csv", vqa), ("segmentation.csv", segmentation)):
        with (out_dir / file).open("w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    return len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (e.g. data/raw/digits)")
    args = parser.parse_args(argv)
    count = export(args.out)
    print(
        f"wrote {count} images, {3 * count} captions, {2 * count} VQA questions and {count}"
        f" segmentation masks under {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
