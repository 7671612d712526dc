"""How long counting the 7B architectures takes, and how much memory it needs (imports included).

    python benchmarks/count_speed.py [--archs llava,flamingo,saisa] [--llm vicuna-7b] [--training]

Counts prefill and one decode step (and, with ``--training``, a pretrain and a finetune step) on
meta tensors, and prints wall time from interpreter start, the time of each count and the peak RSS.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import resource  # noqa: E402

from mllm_bench import PAPER_WORKLOAD, build_model  # noqa: E402
from mllm_bench.flops import count_inference, count_train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="llava,flamingo,saisa")
    parser.add_argument("--llm", default="vicuna-7b")
    parser.add_argument("--vision", default="clip-vit-l-336")
    parser.add_argument("--training", action="store_true", help="also count a pretrain and a finetune step")
    args = parser.parse_args()
    imported = time.perf_counter() - START
    print(f"imports: {imported:.2f} s")
    for arch in args.archs.split(","):
        t0 = time.perf_counter()
        model = build_model(arch, args.llm, args.vision)
        built = time.perf_counter() - t0
        prefill, decode, ctx = count_inference(model, PAPER_WORKLOAD)
        parts = [f"build {built:.2f} s", f"prefill {prefill.total / 1e12:.3f} TFLOP",
                 f"decode@{ctx} {decode.total / 1e9:.2f} GFLOP"]
        if args.training:
            for stage in ("pretrain", "finetune"):
                step = count_train_step(model, PAPER_WORKLOAD.replace(stage=stage))
                parts.append(f"{stage} {step.total / 1e12:.3f} TFLOP")
        print(f"{arch:9s} {time.perf_counter() - t0:5.2f} s  " + ", ".join(parts))
    total = time.perf_counter() - START
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"total (with imports): {total:.2f} s; peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
