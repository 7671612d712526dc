"""fp32-master AdamW: the same fp32 trajectory as AdamW on fp32 weights, written back to bf16 weights."""

from __future__ import annotations

import pytest
import torch

from mllm_bench.config import ConfigError
from mllm_bench.optim import MasterWeightsAdamW, make_optimizer, optimizer_state_bytes


def test_master_weights_follow_fp32_adamw_and_the_bf16_weights_follow_them() -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=gen)
    low = torch.nn.Parameter(start.to(torch.bfloat16))
    ref = torch.nn.Parameter(low.detach().float().clone())
    opt = MasterWeightsAdamW([low], lr=1e-2)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2)
    for _ in range(5):
        grad = torch.randn(5, 3, generator=gen).to(torch.bfloat16)
        opt.zero_grad()
        low.grad = grad.clone()
        ref.grad = grad.float()
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(opt.masters[0], ref.detach(), atol=0, rtol=0)  # the fp32 trajectory, exactly
        assert torch.equal(low.detach(), ref.detach().to(torch.bfloat16))
    assert low.dtype == torch.bfloat16 and opt.masters[0].dtype == torch.float32
    assert opt.masters[0].grad is None  # the fp32 gradient copy is freed after the step
    # moves that bf16 alone could not represent accumulate in the master
    assert not torch.equal(opt.masters[0], opt.masters[0].to(torch.bfloat16).float())


def test_optimizer_names_and_state_bytes() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    assert isinstance(make_optimizer("adamw", [p]), torch.optim.AdamW)
    assert isinstance(make_optimizer("adamw-fp32-master", [p]), MasterWeightsAdamW)
    assert optimizer_state_bytes("adamw", 10) == 60
    assert optimizer_state_bytes("adamw-fp32-master", 10) == 180
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        make_optimizer("sgd", [p])
