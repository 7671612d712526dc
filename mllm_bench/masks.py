"""Attention masks as descriptions, not tensors.

Every architecture here attends causally *by RoPE position*: a query sees the keys whose position is
not after its own. What differs is which rows are queries (SAISA: text only), which keys exist
(visual keys with or without visual queries) and one extra rule (NAAViT: no visual-visual pairs
except a token with itself). An :class:`AttentionMask` carries exactly that, so each attention
backend can turn it into what it needs: a dense boolean tensor (SDPA), ``is_causal`` (flash), or a
block mask (FlexAttention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMask:
    """Who may attend to whom. All tensors are batch-first: queries (B, Tq), keys (B, Tk).

    ``q_pos``/``k_pos``: RoPE positions; ``q_valid``/``k_valid``: False for padding;
    ``q_visual``/``k_visual``: visual tokens; ``visual_to_visual``: False removes attention among
    visual tokens (a visual query still sees itself), the NAAViT rule.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_valid: torch.Tensor
    k_valid: torch.Tensor
    q_visual: torch.Tensor
    k_visual: torch.Tensor
    visual_to_visual: bool = True
    # On meta tensors values are unknown: the builder states whether the mask is plain causal.
    meta_plain_causal: bool = False

    @property
    def num_queries(self) -> int:
        return self.q_pos.shape[1]

    @property
    def num_keys(self) -> int:
        return self.k_pos.shape[1]

    def dense(self) -> torch.Tensor:
        """Boolean (B, 1, Tq, Tk), True where attention is allowed.

        Padding queries are allowed everything so no softmax row is empty (their outputs are never
        used); padding keys are never allowed.
        """
        allowed = self.k_pos.unsqueeze(1) <= self.q_pos.unsqueeze(2)
        allowed = allowed & self.k_valid.unsqueeze(1)
        if not self.visual_to_visual:
            both_visual = self.q_visual.unsqueeze(2) & self.k_visual.unsqueeze(1)
            itself = self.k_pos.unsqueeze(1) == self.q_pos.unsqueeze(2)
            allowed = allowed & ~(both_visual & ~itself)
        allowed = allowed | ~self.q_valid.unsqueeze(2)
        return allowed.unsqueeze(1)

    def is_plain_causal(self) -> bool:
        """True when this is the ordinary lower-triangular mask: queries and keys are the same tokens,
        in position order 0..T-1, with no padding and no extra rule (so ``is_causal=True`` applies)."""
        if not self.visual_to_visual and bool(self.q_visual.any()):
            return False
        if self.q_pos.device.type == "meta":
            return self.meta_plain_causal
        if self.num_queries != self.num_keys:
            return False
        expected = torch.arange(self.num_queries, device=self.q_pos.device)
        return (
            bool(self.q_valid.all())
            and bool(self.k_valid.all())
            and bool((self.q_pos == expected).all())
            and bool((self.k_pos == expected).all())
        )

    def is_bottom_right_causal(self) -> bool:
        """True when queries are the last Tq of Tk keys in position order with no padding and no extra
        rule: a decode step over a full cache, or a prefix-free chunk (``causal`` aligned bottom-right)."""
        if not self.visual_to_visual and bool(self.q_visual.any()):
            return False
        if self.q_pos.device.type == "meta":
            return False
        tq, tk = self.num_queries, self.num_keys
        expected_k = torch.arange(tk, device=self.k_pos.device)
        return (
            tq <= tk
            and bool(self.q_valid.all())
            and bool(self.k_valid.all())
            and bool((self.k_pos == expected_k).all())
            and bool((self.q_pos == expected_k[tk - tq:]).all())
        )


def causal_mask(
    positions: torch.Tensor,
    valid: torch.Tensor | None = None,
    visual: torch.Tensor | None = None,
    visual_to_visual: bool = True,
) -> AttentionMask:
    """The mask of a full sequence attending to itself (queries = keys)."""
    if valid is None:
        valid = torch.ones_like(positions, dtype=torch.bool)
    if visual is None:
        visual = torch.zeros_like(positions, dtype=torch.bool)
    plain = visual_to_visual or not bool(visual.any()) if visual.device.type != "meta" else visual_to_visual
    return AttentionMask(positions, positions, valid, valid, visual, visual, visual_to_visual, meta_plain_causal=plain)
