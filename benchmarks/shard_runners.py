"""Shard runners: VQ-encoding throughput of serial, Prefect threads, Dask and Ray (issue 8).

Encodes the same images (the corpus' documents with the trained ``models/vq`` when present,
else ``--images`` random ones with a freshly initialised tokenizer of the ``params.yaml``
shape) the way the ``tokenize`` stage does — :func:`cm3leon.shards.map_rows` over
:func:`encode_images`, under :func:`flows.shards.run_sharded` — on each runner, and reports in
one run, per runner:

* ``total_seconds``: the whole ``run_sharded`` call (Prefect flow run, cluster start, two
  encodes);
* ``warm_images_per_second``: the second encode, on the warm cluster, and its ratio to serial;
* ``identical``: whether the codes equal the serial path's byte for byte.

Without ``PREFECT_API_URL`` Prefect starts a temporary local server for the non-serial runners.

    python benchmarks/shard_runners.py [--workers N] [--batches-per-shard 4] [--runners ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # flows/

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from machine import describe_machine, save_result  # noqa: E402

from cm3leon.config import load_params  # noqa: E402
from cm3leon.data.corpus import decode_images, read_documents  # noqa: E402
from cm3leon.shards import map_rows  # noqa: E402
from cm3leon.tokenizers.vq import VQModel  # noqa: E402
from cm3leon.tokenizers.vq_training import encode_images, load_vq  # noqa: E402
from flows.shards import ShardSettings, run_sharded  # noqa: E402


def load_inputs(count: int) -> tuple[VQModel, np.ndarray, str]:
    params = load_params(ROOT / "params.yaml")
    if (ROOT / "models/vq/model.safetensors").is_file() and (ROOT / "data/corpus").is_dir():
        table = read_documents(ROOT / "data/corpus", ["id", "image", "height", "width"])
        return load_vq(ROOT / "models/vq")[0], decode_images(table), "models/vq, data/corpus"
    size = params.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return VQModel(params.tokenize.vq).eval(), images, "params.yaml (untrained), random images"


def encode_twice(model, images, batch_size, executor) -> dict:
    encode = partial(encode_images, model, batch_size=batch_size, desc="bench")
    timings, codes = [], None
    for _ in range(2):  # the first pays for worker start-up and imports
        start = time.perf_counter()
        codes = map_rows("encode", encode, images, batch_size, executor)
        timings.append(time.perf_counter() - start)
    return {"codes": codes, "seconds": timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches-per-shard", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml")
    parser.add_argument("--images", type=int, default=6000, help="random images without data")
    parser.add_argument("--runners", default="serial,threads,dask,ray")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    batch_size = args.batch_size or params.tokenize.encode_batch_size
    model, images, source = load_inputs(args.images)
    print(f"{len(images)} images from {source}; batch {batch_size}, {args.workers} workers")
    runners = [r for r in args.runners.split(",") if r]
    if "ray" in runners and importlib.util.find_spec("prefect_ray") is None:
        print("ray: skipped (prefect-ray is not installed: pip install -e '.[ray]')")
        runners.remove("ray")
    results, reference = {}, None
    for runner in runners:
        settings = ShardSettings(
            runner=runner, workers=args.workers, batches_per_shard=args.batches_per_shard
        )
        start = time.perf_counter()
        out = run_sharded("bench", lambda ex: encode_twice(model, images, batch_size, ex), settings)
        total = time.perf_counter() - start
        if reference is None:
            reference = out["codes"]
        warm = out["seconds"][1]
        results[runner] = {
            "total_seconds": total,
            "encode_seconds": out["seconds"],
            "warm_images_per_second": len(images) / warm,
            "identical": bool(out["codes"].tobytes() == reference.tobytes()),
        }
    serial_rate = results[runners[0]]["warm_images_per_second"]
    for runner, row in results.items():
        row["warm_speedup_vs_first"] = row["warm_images_per_second"] / serial_rate
        print(
            f"{runner:8s} total {row['total_seconds']:6.1f} s, warm "
            f"{row['warm_images_per_second']:7.1f} images/s "
            f"({row['warm_speedup_vs_first']:.2f}x {runners[0]}), identical {row['identical']}"
        )
    path = save_result(
        "shard_runners_cpu",
        {
            "benchmark": "shard_runners_vq_encode",
            "machine": describe_machine(),
            "inputs": {"images": len(images), "source": source, "batch_size": batch_size},
            "workers": args.workers,
            "batches_per_shard": args.batches_per_shard,
            "runners": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
