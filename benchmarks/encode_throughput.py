"""Encode throughput of the VQ image tokenizer (issue: tokenize stage).

Measures images/s of ``VQModel.encode`` at several batch sizes, the encoder's FLOPs per image
(counted by ``torch.utils.flop_counter``), and the fraction of this machine's measured fp32
matmul peak that the encoder reaches — all in the same run. Uses the trained tokenizer in
``models/vq`` when present, else a freshly initialised one of the ``params.yaml`` shape (speed
does not depend on the weights).

    python benchmarks/encode_throughput.py [--batch-sizes 1,16,64,256] [--image-size 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine, matmul_peak_flops, save_result, timed  # noqa: E402

from cm3leon.config import load_params  # noqa: E402
from cm3leon.tokenizers.vq import VQModel  # noqa: E402
from cm3leon.tokenizers.vq_training import load_vq  # noqa: E402


def encoder_flops(model: VQModel, image_size: int) -> float:
    x = torch.zeros(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model.encode(x)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,16,64,256")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window per point")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    image_size = args.image_size or params.data.image_size
    if (ROOT / "models/vq/model.safetensors").is_file():
        model, source = load_vq(ROOT / "models/vq")[0], "models/vq"
    else:
        model, source = VQModel(params.tokenize.vq).eval(), "params.yaml (untrained)"
    torch.set_grad_enabled(False)
    peak = matmul_peak_flops()
    flops_per_image = encoder_flops(model, image_size)
    points = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        images = torch.rand(batch, 3, image_size, image_size) * 2 - 1
        seconds = timed(lambda images=images: model.encode(images), min_seconds=args.seconds)
        rate = batch / seconds
        points.append(
            {
                "batch_size": batch,
                "images_per_second": rate,
                "achieved_flops": rate * flops_per_image,
                "fraction_of_matmul_peak": rate * flops_per_image / peak["peak_flops"],
            }
        )
        print(
            f"batch {batch:4d}: {rate:9.1f} images/s, "
            f"{rate * flops_per_image / 1e9:6.2f} GFLOP/s = "
            f"{100 * rate * flops_per_image / peak['peak_flops']:.1f}% of matmul peak"
        )
    result = {
        "benchmark": "vq_encode_throughput",
        "machine": describe_machine(),
        "model": {
            "source": source,
            "config": params.tokenize.vq.__dict__,
            "image_size": image_size,
        },
        "encoder_flops_per_image": flops_per_image,
        "matmul_peak": peak,
        "points": points,
    }
    path = save_result("encode_throughput_cpu", result)
    print(f"matmul peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s; wrote {path}")


if __name__ == "__main__":
    main()
