"""One FSDP2 training step per rank, timed: ``torchrun --nproc-per-node N benchmarks/fsdp_train_step.py``.

Each rank builds the model (on CUDA when present, else CPU/gloo), shards it with FSDP2, and runs
``--steps`` AdamW steps of the chosen stage on its own slice of the batch. Rank 0 prints the
median step time. Use ``--llm tiny-llm --vision tiny-clip`` on a CPU-only machine.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from mllm_bench import Workload, build_model
from mllm_bench.distributed import init_distributed, shard_model
from mllm_bench.timing import time_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="llava")
    parser.add_argument("--llm", default="vicuna-7b")
    parser.add_argument("--vision", default="clip-vit-l-336")
    parser.add_argument("--stage", default="finetune", choices=["pretrain", "finetune"])
    parser.add_argument("--batch-per-rank", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    env = init_distributed()
    dtype = args.dtype if env.device.type == "cuda" else "float32"
    model = build_model(args.arch, args.llm, args.vision, device=str(env.device), dtype=dtype)
    trainable = model.set_stage(args.stage)
    shard_model(model, env.device.type)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    workload = Workload(batch_size=args.batch_per_rank, device=str(env.device), dtype=dtype, stage=args.stage)
    batch = model.example_batch(workload, seed=env.rank)

    def step() -> None:
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup = 1 if args.steps > 1 else 0  # the first step (allocations, lazy init) is not timed
    timed = args.steps - warmup
    timing = time_fn(step, env.device, warmup=warmup, min_repeats=timed, min_seconds=0.0, max_repeats=timed)
    if env.is_main:
        n_trainable = sum(p.numel() for p in trainable.values())
        print(f"{args.arch} {args.llm} {args.stage}: world={env.world_size} trainable={n_trainable / 1e6:.1f}M "
              f"median step {timing.median:.3f}s over {args.steps} steps ({warmup} warm-up)")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
