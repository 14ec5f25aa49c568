"""The pretrain stage's own training steps against the benchmark loop, interleaved in one run.

Issue "throughput where it counts": the default ``pretrain`` stage's useful tokens/s against
``benchmarks/train_throughput.py``'s DeepSpeed loop on the same machine. Timing the two in
separate runs minutes apart measures the VM as much as the code (this 2-core machine's speed
drifts by 10-30% between minutes), so this script alternates them, round after round, in one
process on one DeepSpeed engine:

* ``stage``: the stage's first ``--steps`` optimizer steps of the default run's sample stream
  exactly as :func:`cm3leon.training.pretraining.pretrain` trains them — each step's batch
  built inside the timed step (:func:`~cm3leon.training.pretraining.train_sample` of the step's
  sample numbers, :func:`~cm3leon.training.sequences.collate`), the loop's own
  :func:`~cm3leon.training.loop.training_loss`, ``engine.backward``, ``engine.step`` and the
  loss read back — counting *useful* tokens (targets of weight > 0: not padding, ``<bos>`` or
  CM3 sentinels);
* ``loop``: the benchmark's DeepSpeed step (``engine(inputs)``, ``weighted_loss`` over every
  position of a fixed synthetic batch of the same micro-batch: no padding, every position a
  target) at the mean sequence length of each neighbor count, run for as many steps as the
  stage's steps drew that count.

The ratio of a round is the stage's useful tokens/s over the loop's tokens/s for the same
steps; the issue's target is >= 0.90. Validation and checkpoints are not among these steps
(the stage's ``train/run_tokens_per_second`` counts them).

    python benchmarks/pretrain_stage.py [--params params.yaml] [--steps 24] [--rounds 16]
        [--name pretrain_stage_cpu]

Committed: ``benchmarks/results/pretrain_stage_cpu_xeon.json`` (Intel Xeon, 0.862) and
``pretrain_stage_cpu_epyc.json`` (AMD EPYC, 0.886).

Needs the ``tokenize`` and ``index`` stages' outputs (``data/tokens``, ``data/retrieval``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine, matmul_peak_flops, save_result
from train_throughput import deepspeed_step_fn

from cm3leon import numerics
from cm3leon.config import load_params
from cm3leon.model.transformer import DecoderLM, TransformerShape
from cm3leon.tokenizers.tokens import check_tokens
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.training.deepspeed_setup import init_distributed
from cm3leon.training.loop import training_loss, weighted_loss
from cm3leon.training.pretraining import load_sequences, step_samples, training_batches
from cm3leon.training.sequences import Batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--retrieval", default="data/retrieval")
    parser.add_argument("--steps", type=int, default=24, help="stage steps per round")
    parser.add_argument("--rounds", type=int, default=16, help="alternating rounds")
    parser.add_argument(
        "--name",
        default="pretrain_stage_cpu",
        help="results file benchmarks/results/NAME.json (one per machine keeps each CPU's)",
    )
    args = parser.parse_args()
    found = numerics.read_numerics(args.params)
    if found is not None:  # the stage's kernels; re-executes once if that changes the env
        numerics.pin_process(*found)
    params = load_params(args.params)
    config, seed = params.pretrain, params.base.seed
    train_config = config.train
    if train_config.gradient_accumulation_steps != 1:
        parser.error("times single-micro-step optimizer steps (gradient_accumulation_steps 1)")
    vocab = Vocab.load(args.tokens)
    manifest = check_tokens(args.tokens, vocab)
    shape = TransformerShape.from_config(
        config.model, vocab.size, vocab.image_offset, manifest["image_tokens"]
    )
    _, sequences, _ = load_sequences(args.tokens, args.retrieval, config, seed, shape.max_seq_len)
    grouped = step_samples(train_config, 1) if train_config.length_grouping else None
    size = train_config.micro_batch_size
    batch_for = training_batches(sequences, train_config, seed, 1)

    def stage_batch(step: int) -> Batch:  # the stage's own batches, one process
        return batch_for(step, 0, 0, 1)

    # the steps' neighbor counts and each count's mean sequence length (untimed probe)
    steps = range(args.steps)
    count_of = {s: sequences.neighbor_count(s) if grouped else -1 for s in steps}
    lengths: dict[int, list[float]] = {}
    for s in steps:
        batch = stage_batch(s)
        lengths.setdefault(count_of[s], []).append(float(batch.real.sum(1).float().mean()))
    mean_length = {k: round(statistics.mean(v)) for k, v in lengths.items()}
    drawn = Counter(count_of.values())

    init_distributed()
    torch.manual_seed(seed)
    model = DecoderLM(shape)
    # the engine exactly as train_throughput.py's DeepSpeed loop builds it
    engine, _ = deepspeed_step_fn(model, train_config, stage_batch(0), torch.device("cpu"), False)
    generator = torch.Generator().manual_seed(0)
    synthetic = {}
    for k, length in mean_length.items():
        ids = torch.randint(shape.vocab_size, (size, length + 1), generator=generator)
        synthetic[k] = Batch(
            ids[:, :-1].contiguous(),
            ids[:, 1:].contiguous(),
            torch.ones(size, length),
            torch.ones(size, length, dtype=torch.bool),
        )

    def train_step(batch: Batch) -> None:  # the stage's step
        loss = training_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        loss.item()

    def loop_step(batch: Batch) -> None:  # train_throughput.py's DeepSpeed step
        loss = weighted_loss(engine(batch.inputs), batch)
        engine.backward(loss)
        engine.step()
        loss.item()

    def stage_round() -> dict[str, float]:
        useful, build, start = 0, 0.0, time.perf_counter()
        for s in steps:
            built = time.perf_counter()
            batch = stage_batch(s)
            build += time.perf_counter() - built
            train_step(batch)
            useful += batch.tokens
        seconds = time.perf_counter() - start
        return {"tokens_per_second": useful / seconds, "build_share": build / seconds}

    def loop_round() -> dict[str, float]:
        tokens, seconds = 0, 0.0
        for k, n in drawn.items():
            start = time.perf_counter()
            for _ in range(n):
                loop_step(synthetic[k])
            seconds += time.perf_counter() - start
            tokens += n * synthetic[k].inputs.numel()
        return {"tokens_per_second": tokens / seconds}

    for k in synthetic:  # warm-up: every shape once, and a few stage steps
        loop_step(synthetic[k])
    for s in range(3):
        train_step(stage_batch(s))
    rounds = []
    for r in range(args.rounds):
        if r % 2 == 0:  # alternate which goes first
            stage, loop = stage_round(), loop_round()
        else:
            loop, stage = loop_round(), stage_round()
        ratio = stage["tokens_per_second"] / loop["tokens_per_second"]
        rounds.append({"stage": stage, "loop": loop, "ratio": ratio})
        print(
            f"round {r + 1}/{args.rounds}: stage {stage['tokens_per_second']:,.0f} useful "
            f"tokens/s (batch building {100 * stage['build_share']:.1f}%), loop "
            f"{loop['tokens_per_second']:,.0f} tokens/s, ratio {ratio:.3f}",
            flush=True,
        )
    peak = matmul_peak_flops("cpu", torch.float32)["peak_flops"]
    ratios = sorted(r["ratio"] for r in rounds)
    median = statistics.median(ratios)
    stage_median = statistics.median(r["stage"]["tokens_per_second"] for r in rounds)
    mfu = stage_median * model.flops_per_token(round(statistics.mean(mean_length.values()))) / peak
    print(
        f"stage / loop: median {median:.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f}, "
        f"{len(ratios)} rounds; target >= 0.90: {'MET' if median >= 0.90 else 'NOT MET'}); "
        f"stage useful-token MFU ~{100 * mfu:.1f}% of a {peak / 1e9:.0f} GFLOP/s matmul peak"
    )
    path = save_result(
        args.name,
        {
            "machine": describe_machine(),
            "numerics": numerics.record(),
            "steps_per_round": args.steps,
            "neighbor_counts_drawn": {str(k): n for k, n in sorted(drawn.items())},
            "mean_sequence_length": {str(k): v for k, v in sorted(mean_length.items())},
            "rounds": rounds,
            "ratio_median": median,
            "ratio_range": [ratios[0], ratios[-1]],
            "stage_useful_tokens_per_second_median": stage_median,
            "matmul_peak_flops": peak,
            "target_ratio": 0.90,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
