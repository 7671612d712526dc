"""Attention masks as descriptions, not tensors.

Every architecture here attends causally *by RoPE position*: a query sees the keys whose position is
not after its own. What differs is which rows are queries (e.g. text only), which keys exist (visual
keys with or without visual queries) and, optionally, one extra rule an architecture defines as a
:class:`MaskRule` (a named element-wise predicate). An :class:`AttentionMask` carries exactly that, so
each attention backend can turn it into what it needs: a dense boolean tensor (SDPA), ``is_causal``
(flash), or a block mask (FlexAttention), all from the same predicate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class MaskRule:
    """An extra attention rule on top of causal-by-position, defined by the architecture that uses it.

    ``allowed`` is element-wise over broadcast query/key tensors (positions and visual flags), so the
    dense mask and FlexAttention's ``mask_mod`` evaluate the same predicate. ``applies`` says whether the
    rule removes anything from a given mask (reads values: called once per mask); a mask whose rule
    applies has no static block structure and is never plain causal.
    """

    name: str = ""

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor, q_visual: torch.Tensor,
                k_visual: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def applies(self, mask: AttentionMask) -> bool:
        return True


@dataclass
class AttentionMask:
    """Who may attend to whom. All tensors are batch-first: queries (B, Tq), keys (B, Tk).

    ``q_pos``/``k_pos``: RoPE positions; ``q_valid``/``k_valid``: False for padding;
    ``q_visual``/``k_visual``: visual tokens; ``rule``: an architecture's extra :class:`MaskRule`.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_valid: torch.Tensor
    k_valid: torch.Tensor
    q_visual: torch.Tensor
    k_visual: torch.Tensor
    rule: MaskRule | None = None
    # On meta tensors values are unknown: the builder states whether the mask is plain causal.
    meta_plain_causal: bool = False
    # Optional hint for fast paths: the same mask as static blocks (see :class:`MaskStructure`). A
    # builder that knows it from shapes sets it; otherwise :meth:`static_structure` infers it once.
    structure: MaskStructure | None = None
    # Per-mask memo (inferred structure, FlexAttention block mask): built once, reused by every layer.
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_queries(self) -> int:
        return self.q_pos.shape[1]

    @property
    def num_keys(self) -> int:
        return self.k_pos.shape[1]

    def dense(self) -> torch.Tensor:
        """Boolean (B, 1, Tq, Tk), True where attention is allowed.

        Padding queries are allowed everything so no softmax row is empty (their outputs are never
        used); padding keys are never allowed. Built once per mask (memoised): every layer reuses it.
        """
        if "dense" not in self.memo:
            self.memo["dense"] = self._build_dense()
        return self.memo["dense"]

    def _build_dense(self) -> torch.Tensor:
        allowed = self.k_pos.unsqueeze(1) <= self.q_pos.unsqueeze(2)
        allowed = allowed & self.k_valid.unsqueeze(1)
        if self.rule is not None:
            allowed = allowed & self.rule.allowed(self.q_pos.unsqueeze(2), self.k_pos.unsqueeze(1),
                                                  self.q_visual.unsqueeze(2), self.k_visual.unsqueeze(1))
        allowed = allowed | ~self.q_valid.unsqueeze(2)
        return allowed.unsqueeze(1)

    def is_plain_causal(self) -> bool:
        """True when this is the ordinary lower-triangular mask: queries and keys are the same tokens,
        in position order 0..T-1, with no padding and no extra rule (so ``is_causal=True`` applies)."""
        if self.q_pos.device.type == "meta":  # values unknown (and unreadable): trust the builder
            return self.meta_plain_causal
        if "plain_causal" not in self.memo:  # reads values (a device sync): once per mask, not per layer
            self.memo["plain_causal"] = self._check_plain_causal()
        return self.memo["plain_causal"]

    def rule_applies(self) -> bool:
        """Whether the extra rule removes any pair from this mask (memoised: reads values once)."""
        if self.rule is None:
            return False
        if "rule_applies" not in self.memo:
            self.memo["rule_applies"] = bool(self.rule.applies(self))
        return self.memo["rule_applies"]

    def _check_plain_causal(self) -> bool:
        if self.rule_applies():
            return False
        if self.num_queries != self.num_keys:
            return False
        expected = torch.arange(self.num_queries, device=self.q_pos.device)
        return (
            bool(self.q_valid.all())
            and bool(self.k_valid.all())
            and bool((self.q_pos == expected).all())
            and bool((self.k_pos == expected).all())
        )

    def static_structure(self) -> MaskStructure | None:
        """The ``structure`` hint, else the inferred one (memoised on this mask; None when it has none)."""
        if self.structure is not None:
            return self.structure
        if "structure" not in self.memo:
            self.memo["structure"] = infer_structure(self)
        return self.memo["structure"]


def causal_mask(
    positions: torch.Tensor,
    valid: torch.Tensor | None = None,
    visual: torch.Tensor | None = None,
    rule: MaskRule | None = None,
) -> AttentionMask:
    """The mask of a full sequence attending to itself (queries = keys)."""
    if valid is None:
        valid = torch.ones_like(positions, dtype=torch.bool)
    if visual is None:
        visual = torch.zeros_like(positions, dtype=torch.bool)
    # meta_plain_causal is read on meta tensors only (elsewhere the values are checked), so no host sync here
    return AttentionMask(positions, positions, valid, valid, visual, visual, rule,
                         meta_plain_causal=rule is None)


# ----- static structure: what fused kernels need, decided once per mask ---------------------------


@dataclass(frozen=True)
class QueryBlock:
    """Queries ``[q_start, q_end)`` attend to the keys of ``k_ranges`` (concatenated in that order).

    ``causal``: causal aligned to the bottom right over those keys (query r of n sees the first
    ``num_keys - n + r + 1``), as ``torch.nn.attention.bias.causal_lower_right``; otherwise all of
    them. No key ranges means the queries see nothing (output zero).
    """

    q_start: int
    q_end: int
    k_ranges: tuple[tuple[int, int], ...]
    causal: bool = True

    @property
    def num_queries(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_keys(self) -> int:
        return sum(end - start for start, end in self.k_ranges)


@dataclass(frozen=True)
class MaskStructure:
    """An :class:`AttentionMask` as a few static query blocks, the same for every sample (no padding).

    Plain causal is one block ``(0, T, ((0, T),))``; a decode step or a prefix-free chunk one block over
    all keys; SAISA's text queries one block per text segment between images (the prefix over its own
    keys, each later segment over the visual keys before it and the text up to itself).
    """

    num_queries: int
    num_keys: int
    blocks: tuple[QueryBlock, ...]

    @property
    def kind(self) -> str:
        """``causal`` (upper-left = lower-right, square), ``lower_right`` (one block, all keys) or ``split``."""
        if len(self.blocks) == 1 and self.blocks[0].k_ranges == ((0, self.num_keys),) and self.blocks[0].causal:
            return "causal" if self.num_queries == self.num_keys else "lower_right"
        return "split"

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean (Tq, Tk), True where allowed (to check a structure against ``AttentionMask.dense``)."""
        out = torch.zeros(self.num_queries, self.num_keys, dtype=torch.bool, device=device)
        for blk in self.blocks:
            if not blk.k_ranges:
                continue
            keys = torch.cat([torch.arange(s, e, device=device) for s, e in blk.k_ranges])
            rows = torch.ones(blk.num_queries, blk.num_keys, dtype=torch.bool, device=device)
            out[blk.q_start:blk.q_end, keys] = rows.tril(blk.num_keys - blk.num_queries) if blk.causal else rows
        return out


def causal_structure(num_queries: int, num_keys: int | None = None) -> MaskStructure:
    """Queries are the last ``num_queries`` of ``num_keys`` keys in order: plain or bottom-right causal."""
    num_keys = num_queries if num_keys is None else num_keys
    return MaskStructure(num_queries, num_keys, (QueryBlock(0, num_queries, ((0, num_keys),)),))


MAX_STATIC_BLOCKS = 16


def _runs(flags: list[bool], offset: int = 0) -> list[tuple[int, int]]:
    """Index ranges [start, end) of the True runs in ``flags``."""
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == offset + i:
            runs[-1] = (runs[-1][0], offset + i + 1)
        elif flag:
            runs.append((offset + i, offset + i + 1))
    return runs


def infer_structure(mask: AttentionMask) -> MaskStructure | None:
    """The static blocks of ``mask``, or None when it has none (padding, an extra rule, per-sample layouts).

    Needs the queries to be the last ``Tq`` keys (the order :class:`~mllm_bench.decoder.SelfAttention`
    builds: [cache, key-only rows, the queries' own rows]) in increasing position. The rest of the keys
    ("extra" keys) may be anywhere; consecutive queries that see the same extra keys form one block.
    Reads the mask's values (one device-to-host copy of its small index tensors), so call it once per
    mask, not per layer: :meth:`AttentionMask.static_structure` memoises it.
    """
    if mask.q_pos.device.type == "meta":
        if mask.meta_plain_causal and mask.num_queries == mask.num_keys:
            return causal_structure(mask.num_queries)
        return None
    tq, tk = mask.num_queries, mask.num_keys
    if tq == 0 or tk < tq:
        return None
    cpu = {name: getattr(mask, name).cpu() for name in ("q_pos", "k_pos", "q_valid", "k_valid")}
    if not (bool(cpu["q_valid"].all()) and bool(cpu["k_valid"].all())):
        return None
    if mask.rule_applies():
        return None
    q_pos, k_pos = cpu["q_pos"], cpu["k_pos"]
    if not (bool((q_pos == q_pos[:1]).all()) and bool((k_pos == k_pos[:1]).all())):
        return None
    q, k = q_pos[0], k_pos[0]
    extra = tk - tq
    if not bool((k[extra:] == q).all()) or (tq > 1 and not bool((q[1:] > q[:-1]).all())):
        return None
    sees = k[:extra].view(1, -1) <= q.view(-1, 1)  # (Tq, extra): extra keys each query sees
    change = [0] + [i + 1 for i in torch.nonzero((sees[1:] != sees[:-1]).any(-1)).flatten().tolist()] + [tq]
    if len(change) - 1 > MAX_STATIC_BLOCKS:
        return None
    blocks = []
    for start, end in zip(change[:-1], change[1:], strict=True):
        ranges = _runs(sees[start].tolist()) + [(extra, extra + end)]
        if len(ranges) > 1 and ranges[-2][1] == extra:  # extra keys run into the queries' own: one slice
            ranges[-2:] = [(ranges[-2][0], extra + end)]
        blocks.append(QueryBlock(start, end, tuple(ranges)))
    return MaskStructure(tq, tk, tuple(blocks))


def mask_mod(mask: AttentionMask) -> Callable[..., torch.Tensor]:
    """``mask`` as a FlexAttention ``mask_mod(b, h, q, k)``, exactly :meth:`AttentionMask.dense`."""
    q_pos, k_pos, q_valid, k_valid = mask.q_pos, mask.k_pos, mask.q_valid, mask.k_valid
    q_visual, k_visual, rule = mask.q_visual, mask.k_visual, mask.rule

    def allowed(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ok = (k_pos[b, k] <= q_pos[b, q]) & k_valid[b, k]
        if rule is not None:
            ok = ok & rule.allowed(q_pos[b, q], k_pos[b, k], q_visual[b, q], k_visual[b, k])
        return ok | ~q_valid[b, q]

    return allowed
