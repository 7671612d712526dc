"""Small shared helpers for the tests: tiny models with their own random weights, tiny batches."""

from __future__ import annotations

import torch

from mllm_bench import MultimodalBatch, build_model
from mllm_bench.model import MLLM
from mllm_bench.registry import architecture_spec


def tiny_model(arch: str, llm: str = "tiny-llm", vision: str = "tiny-clip", seed: int = 0, **options) -> MLLM:
    """A tiny fp32 CPU model with deterministic random weights (biases and norms randomised too), built with
    the architecture's ``spec.tiny_options`` updated by ``options``."""
    torch.manual_seed(seed)
    opts = {**architecture_spec(arch).tiny_options, **options}
    model = build_model(arch, llm, vision, options=opts, device="cpu", dtype="float32")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(("attn_gate", "ff_gate")):  # Flamingo's tanh gates start closed
                p.fill_(0.0)
    return model.eval()


def random_batch(model: MLLM, batch: int = 2, text: int = 10, positions: list[list[int]] | None = None,
                 seed: int = 1, labels: bool = False, vocab_limit: int | None = None,
                 pad: list[int] | None = None) -> MultimodalBatch:
    """A random batch; ``positions`` per sample gives each image's text index (default one image at 3);
    ``pad[b]``: the first pad[b] text tokens of sample b are left padding."""
    gen = torch.Generator().manual_seed(seed)
    positions = positions if positions is not None else [[3]] * batch
    k = len(positions[0])
    size = model.vision_config.image_size
    vocab = vocab_limit or model.llm_config.vocab_size
    ids = torch.randint(0, vocab, (batch, text), generator=gen)
    pixels = torch.randn(batch, k, 3, size, size, generator=gen)
    pos = torch.tensor(positions, dtype=torch.long).reshape(batch, k)
    mask = None
    if pad is not None:
        mask = torch.ones(batch, text, dtype=torch.bool)
        for b, n in enumerate(pad):
            mask[b, :n] = False
    return MultimodalBatch(ids, pixels, pos, mask, ids.clone() if labels else None)


def set_gates(model: MLLM, value: float = 0.7) -> None:
    """Open Flamingo's tanh gates (they start closed, which hides the images)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.fill_(value)


def assert_gradients_reach_exactly(model: MLLM, trainable: dict) -> None:
    """Every trainable parameter got a non-zero gradient, every other one none at all."""
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
