"""Analytic cost model: closed-form FLOPs per component, built from how a model is wired.

Conventions (DESIGN.md, "Measurement conventions"):

* A multiply-add is 2 FLOPs. Only matrix products are counted (linear layers, the patch-embedding
  convolution, attention's QK^T and PV); element-wise work (norms, activations, softmax, RoPE,
  residuals) is not, exactly as ``torch.utils.flop_counter`` does not.
* Attention in two conventions: ``dense`` counts every query-key pair the kernel computes (no mask
  discount; the SAISA paper's convention) and ``effective`` only the pairs the mask allows (causal,
  plus each architecture's own rule, whose pair count it passes in).
* Training = forward + backward. A linear layer's backward costs one forward for the weight gradient
  when the weight is trained and one for the input gradient when something upstream is trained.
  Attention's backward (the math path that runs on meta tensors: S = QK^T, O = PV) costs dQ, dK
  (one QK^T each), dP and dV (one PV each) for the operands that need gradients, i.e. 2x the forward
  when everything needs gradients. torch's fused SDPA backward formula also counts recomputing S
  (2.5x); we follow the path we count and say so.
* Roles: the token whose row a term computes (for attention, the query); ``media`` for rows that are
  neither text nor visual tokens of the sequence (e.g. resampled latents read by cross-attention).

Architectures compose these in data-flow order in their ``analytic_cost``: the primitives (``linear``,
``scores``, ``recompute``, ``kv_cache``, ``decoder_layer_linears``, ``decode_layers``) and the wirings two or
more architectures share (vision tower, MLP connector, spliced-sequence decoder, decoder with key/value-only
visual rows, lm_head); an
architecture's own wiring lives in its file. Nothing here is named after an architecture.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .choices import CONVENTIONS as CONVENTIONS  # re-exported
from .choices import SCOPES as SCOPES
from .config import ConfigError, LLMConfig, VisionConfig
from .workload import Workload

COMPONENTS: tuple[str, ...] = (
    "vision", "connector", "attn_proj", "attn_scores", "ffn", "cross_attn", "lm_head", "embedding", "norm",
)
LANGUAGE_COMPONENTS = frozenset({"connector", "attn_proj", "attn_scores", "ffn", "cross_attn"})
PHASES: tuple[str, ...] = ("prefill", "decode", "train_step")
PASSES: tuple[str, ...] = ("forward", "backward", "recompute")


@dataclass(frozen=True)
class Term:
    """FLOPs of one (phase, component, role, pass) piece, in both attention conventions."""

    phase: str
    component: str
    role: str
    pass_: str
    dense: float
    effective: float

    def value(self, convention: str) -> float:
        return self.dense if convention == "dense" else self.effective


def _check(name: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def in_scope(component: str, scope: str) -> bool:
    """``language`` = connector + decoder (+ cross-attention); ``total`` = everything."""
    return scope == "total" or component in LANGUAGE_COMPONENTS


@dataclass
class CostBreakdown:
    """Analytic FLOPs of one workload by phase, component, role and pass, plus memory-relevant sizes.

    ``kv_cache_bytes`` is per sample by role after the prompt and ``generate_tokens`` tokens;
    ``activation_bytes`` estimates what a training step keeps for backward (whole batch).
    """

    terms: list[Term] = field(default_factory=list)
    kv_cache_bytes: dict[str, float] = field(default_factory=dict)
    # (phase, role) -> [rows with a query, attention output and FFN; rows with keys/values], summed over the
    # decoder's layers (whole batch): what row-wise conventions (element-wise ops, layer-averaged tokens) need
    decoder_rows: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    # phase -> query-key pairs the decoder's self-attention computes (dense), summed over layers and the batch
    decoder_pairs: dict[str, float] = field(default_factory=dict)
    activation_bytes: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, phase: str, component: str, role: str, pass_: str, dense: float, effective: float | None = None):
        if component not in COMPONENTS:
            raise ConfigError(f"cost term component must be one of {list(COMPONENTS)}, got {component!r}")
        if dense:
            self.terms.append(Term(phase, component, role, pass_, float(dense),
                                   float(dense if effective is None else effective)))

    def flops(self, phase: str | None = None, convention: str = "dense", scope: str = "total",
              component: str | None = None, role: str | None = None, pass_: str | None = None) -> float:
        """Sum of the matching terms (None = any)."""
        _check("phase", phase, PHASES)
        _check("convention", convention, CONVENTIONS)
        _check("scope", scope, SCOPES)
        _check("component", component, COMPONENTS)
        _check("pass_", pass_, PASSES)
        return sum(
            t.value(convention) for t in self.terms
            if (phase is None or t.phase == phase) and in_scope(t.component, scope)
            and (component is None or t.component == component) and (role is None or t.role == role)
            and (pass_ is None or t.pass_ == pass_)
        )

    def by(self, key: str, phase: str | None = None, convention: str = "dense",
           scope: str = "total") -> dict[str, float]:
        """FLOPs grouped by ``component``, ``role`` or ``pass_``."""
        out: dict[str, float] = defaultdict(float)
        for t in self.terms:
            if (phase is None or t.phase == phase) and in_scope(t.component, scope):
                out[getattr(t, key)] += t.value(convention)
        return dict(out)

    @property
    def phases(self) -> list[str]:
        return [p for p in PHASES if any(t.phase == p for t in self.terms)]

    def rows(self, phase: str, role: str | None = None) -> tuple[float, float]:
        """(full rows, key/value rows) of the decoder's layers in ``phase``, summed over layers and the batch."""
        picked = [v for (p, r), v in self.decoder_rows.items() if p == phase and role in (None, r)]
        return sum(v[0] for v in picked), sum(v[1] for v in picked)


# ----- sequence shapes and attention pairs ---------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    role: str  # "text" or "visual"
    length: int


def sequence_segments(workload: Workload, tokens_per_image: int) -> list[Segment]:
    """One sample's spliced sequence: text_before, image, text_between, image, ..., text_after."""
    segs = [Segment("text", workload.text_before)]
    for i in range(workload.images_per_sample):
        if i:
            segs.append(Segment("text", workload.text_between))
        segs.append(Segment("visual", tokens_per_image))
    segs.append(Segment("text", workload.text_after))
    return [s for s in segs if s.length]


def causal_pairs(segments: list[Segment], query_roles: tuple[str, ...] = ("text", "visual")) -> dict[str, int]:
    """Allowed (query, key) pairs per query role, keys = every token, causal by position."""
    pairs: dict[str, int] = defaultdict(int)
    before = 0
    for seg in segments:
        n = seg.length
        if seg.role in query_roles:
            pairs[seg.role] += n * before + n * (n + 1) // 2
        before += n
    return dict(pairs)


def rows_by_role(segments: list[Segment]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for s in segments:
        out[s.role] += s.length
    return dict(out)


# ----- the builder ---------------------------------------------------------------------------------
class CostModel:
    """Accumulates analytic terms for ``workload``; wiring functions are called in data-flow order.

    Each wiring function takes ``trainable`` (its weights get gradients in this stage) and ``grad_in``
    (its input activations need gradients: something upstream is trained) and returns whether its
    output needs gradients. For inference the phases are ``prefill`` and one ``decode`` step with
    ``context_len`` cached tokens (default: the prompt); for training, ``train_step``.
    """

    def __init__(self, llm: LLMConfig, workload: Workload, tokens_per_image: int, context_len: int | None = None):
        self.llm = llm
        self.workload = workload
        self.batch = workload.batch_size
        self.training = workload.is_training
        self.segments = sequence_segments(workload, tokens_per_image)
        self.tokens_per_image = tokens_per_image
        self.num_images = workload.images_per_sample
        self.text = workload.num_text_tokens
        self.visual = self.num_images * tokens_per_image
        self.context_len = context_len
        self.bytes_per_element = workload.torch_dtype.itemsize
        self.cost = CostBreakdown(info={"stage": workload.stage, "batch_size": self.batch})
        self._activations = 0.0

    def add_activations(self, elements: float) -> None:
        """Elements a training step keeps for backward (``result`` turns them into bytes)."""
        self._activations += elements

    @property
    def phases(self) -> tuple[str, ...]:
        return ("train_step",) if self.training else ("prefill", "decode")

    def result(self) -> CostBreakdown:
        self.cost.activation_bytes = self._activations * self.bytes_per_element
        return self.cost

    # ----- primitive matmuls ---------------------------------------------------------------------
    def linear(self, phase: str, component: str, role: str, rows: float, d_in: int, d_out: int,
               trainable: bool = False, grad_in: bool = False, count: int = 1) -> None:
        """``count`` linear layers applied to ``rows`` rows: 2·rows·d_in·d_out each."""
        f = 2.0 * rows * d_in * d_out * count
        self.cost.add(phase, component, role, "forward", f)
        if phase == "train_step":
            self.cost.add(phase, component, role, "backward", f * (int(trainable) + int(grad_in)))
            if trainable:
                self._activations += rows * d_in * count  # the input, kept for the weight gradient

    def scores(self, phase: str, component: str, role: str, dense_pairs: float, effective_pairs: float,
               qk_width: int, v_width: int, q_grad: bool = False, kv_grad: bool = False, count: int = 1) -> None:
        """Attention S = QK^T and O = PV over query-key pairs; widths are heads x head_dim."""
        qk = 2.0 * qk_width * count
        pv = 2.0 * v_width * count
        if component == "attn_scores":
            self.cost.decoder_pairs[phase] = self.cost.decoder_pairs.get(phase, 0.0) + dense_pairs * count
        self.cost.add(phase, component, role, "forward", dense_pairs * (qk + pv), effective_pairs * (qk + pv))
        if phase == "train_step":
            # dQ, dK from QK^T; dP (needed if Q or K needs it) and dV from PV
            factor_qk = int(q_grad) + int(kv_grad)
            factor_pv = int(q_grad or kv_grad) + int(kv_grad)
            bw = factor_qk * qk + factor_pv * pv
            self.cost.add(phase, component, role, "backward", dense_pairs * bw, effective_pairs * bw)

    def recompute(self, start: int, last_linear: dict[tuple[str, str], float]) -> None:
        """Activation checkpointing: the forward terms added since ``start`` run again in backward.

        torch's non-reentrant checkpoint stops recomputing as soon as every saved tensor is back, so
        the region's last linear (whose output nothing saves) is not rerun: ``last_linear`` gives
        its forward FLOPs per (component, role), subtracted here.
        """
        again: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for t in self.cost.terms[start:]:
            if t.pass_ == "forward" and t.phase == "train_step":
                again[(t.component, t.role)][0] += t.dense
                again[(t.component, t.role)][1] += t.effective
        for (component, role), (dense, effective) in again.items():
            skip = last_linear.get((component, role), 0.0)
            self.cost.add("train_step", component, role, "recompute", dense - skip, effective - skip)

    # ----- vision side ---------------------------------------------------------------------------
    def vision_tower(self, vision: VisionConfig, trainable: bool = False) -> bool:
        """A ViT run to its feature layer on every image (patch conv, ``layers_run`` pre-norm layers)."""
        d, n_img = vision.hidden_size, self.batch * self.num_images
        if not n_img:
            return False
        n = vision.num_patches + int(vision.has_cls_token)
        for phase in self.phases:
            if phase == "decode":
                continue
            L = vision.layers_run
            self.linear(phase, "vision", "visual", n_img * vision.num_patches, 3 * vision.patch_size ** 2, d,
                        trainable)
            self.linear(phase, "vision", "visual", n_img * n, d, d, trainable, trainable, count=4 * L)
            self.scores(phase, "vision", "visual", n_img * n * n, n_img * n * n, d, d, trainable, trainable, L)
            self.linear(phase, "vision", "visual", n_img * n, d, vision.intermediate_size, trainable, trainable, L)
            self.linear(phase, "vision", "visual", n_img * n, vision.intermediate_size, d, trainable, trainable, L)
            if trainable:
                self._activations += n_img * n * L * (4 * d + 2 * vision.intermediate_size)
        return trainable

    def mlp_connector(self, d_in: int, d_out: int, trainable: bool, grad_in: bool = False, count: int = 1,
                      role: str = "visual") -> bool:
        """``count`` two-layer MLPs Linear(d_in, d_out) -> GELU -> Linear(d_out, d_out) on every visual token."""
        rows = self.batch * self.visual
        for phase in self.phases:
            if phase == "decode":
                continue
            self.linear(phase, "connector", role, rows, d_in, d_out, trainable, grad_in, count)
            self.linear(phase, "connector", role, rows, d_out, d_out, trainable, trainable or grad_in, count)
        return trainable or grad_in

    # ----- decoder ---------------------------------------------------------------------------------
    @property
    def q_width(self) -> int:
        return self.llm.num_heads * self.llm.head_dim

    def decode_layers(self, layers: int, visual_in_cache: bool) -> None:
        """One decode step through ``layers`` decoder layers: the new text token over the cache and itself.

        The cache holds ``context_len`` tokens, by default the prompt (its visual tokens only when
        ``visual_in_cache``). Gradients play no part in decode.
        """
        ctx = self.context_len
        if ctx is None:
            ctx = self.text + (self.visual if visual_in_cache else 0)
        b, width = self.batch, self.q_width
        self.decoder_layer_linears("decode", {"text": b}, {"text": b}, False, False, count=layers)
        self.scores("decode", "attn_scores", "text", b * (ctx + 1), b * (ctx + 1), width, width, count=layers)

    def decoder_layer_linears(self, phase: str, rows: dict[str, float], kv_rows: dict[str, float], trainable: bool,
                       grad_in: bool, kv_grad: dict[str, bool] | None = None, count: int = 1) -> None:
        """Q/O and the FFN on ``rows``; K/V on ``kv_rows`` (GQA: width kv_dim)."""
        h, kv, m = self.llm.hidden_size, self.llm.kv_dim, self.llm.intermediate_size
        q_width = self.q_width
        for role in rows.keys() | kv_rows.keys():
            tally = self.cost.decoder_rows.setdefault((phase, role), [0.0, 0.0])
            tally[0] += rows.get(role, 0) * count
            tally[1] += kv_rows.get(role, 0) * count
        for role, n in rows.items():
            self.linear(phase, "attn_proj", role, n, h, q_width, trainable, grad_in, count)
        for role, n in kv_rows.items():
            g = grad_in if kv_grad is None else kv_grad[role]
            self.linear(phase, "attn_proj", role, n, h, kv, trainable, g, 2 * count)
        for role, n in rows.items():
            # the attention output needs gradients whenever anything in attention does
            out_grad = grad_in or trainable or bool(kv_grad and any(kv_grad.values()))
            self.linear(phase, "attn_proj", role, n, q_width, h, trainable, out_grad, count)
            self.linear(phase, "ffn", role, n, h, m, trainable, out_grad, 2 * count)
            self.linear(phase, "ffn", role, n, m, h, trainable, out_grad, count)
            if phase == "train_step" and out_grad:
                self._activations += count * n * (4 * h + 2 * q_width + 3 * m)
        if phase == "train_step":
            for role, n in kv_rows.items():
                if (grad_in if kv_grad is None else kv_grad[role]) or trainable:
                    self._activations += count * n * 2 * kv

    def down_proj(self, rows: float, layers: int) -> float:
        """Forward FLOPs of the FFN's last linear (what checkpoint recomputation skips)."""
        return 2.0 * rows * self.llm.intermediate_size * self.llm.hidden_size * layers

    def spliced_decoder(self, pairs: dict[str, int] | None = None, trainable: bool = False, grad_in: bool = False,
                        num_layers: int | None = None) -> bool:
        """Every token (text and spliced visual) is a full decoder token: Q, K, V, O, FFN, causal attention.

        ``pairs``: the allowed (query, key) pairs of one sample per query role under the architecture's
        mask (default :func:`causal_pairs`), used by the effective convention; the dense convention
        counts what the kernel computes.
        """
        L = self.llm.num_layers if num_layers is None else num_layers
        width = self.q_width
        b, rows = self.batch, rows_by_role(self.segments)
        n = sum(rows.values())
        batch_rows = {r: b * k for r, k in rows.items()}
        g = grad_in or trainable
        eff = causal_pairs(self.segments) if pairs is None else pairs
        for phase in self.phases:
            if phase == "decode":
                self.decode_layers(L, visual_in_cache=True)
                continue
            start = len(self.cost.terms)
            self.decoder_layer_linears(phase, batch_rows, batch_rows, trainable, g, count=L)
            for role, k in rows.items():
                self.scores(phase, "attn_scores", role, b * k * n, b * eff.get(role, 0), width, width, g, g, L)
            if phase == "train_step" and self.workload.gradient_checkpointing and g:
                self.recompute(start, {("ffn", r): self.down_proj(b * k, L) for r, k in rows.items()})
        self.kv_cache(L, visual_in_cache=True)
        return g

    def key_value_visual_decoder(self, kv_only_layers: Sequence[bool], trainable: bool = False,
                                 grad_in: bool = False, visual_grad: bool = False,
                                 visual_per_layer: bool = False) -> bool:
        """Decoder with two kinds of layer. Where ``kv_only_layers[i]`` is True the visual rows give keys and
        values only (input RMSNorm, K, V; no query, attention output or FFN) and text queries see them causally
        by position; elsewhere every row is a full token, plain causal (as :meth:`spliced_decoder`). Returns
        whether the text stream leaving the decoder needs gradients.

        Gradients are tracked per stream. ``grad_in``: the text rows entering layer 0 need them;
        ``visual_grad``: the visual rows entering layer 0 do or, with ``visual_per_layer``, the visual rows
        handed to every key/value-only layer (each from its own projector). Without it the visual rows of a
        key/value-only layer are those the previous layer left, unchanged by it. A full layer's rows form one
        tensor: all of them need input gradients when either stream does.
        """
        L, width = self.llm.num_layers, self.q_width
        b, t, v = self.batch, self.text, self.visual
        if len(kv_only_layers) != L:
            raise ConfigError(f"kv_only_layers must give one flag per decoder layer ({L}), got {len(kv_only_layers)}")
        rows = rows_by_role(self.segments)
        n = sum(rows.values())
        eff_text = causal_pairs(self.segments, query_roles=("text",)).get("text", 0)
        eff_full = causal_pairs(self.segments)
        # per-layer gradient flags; layers of the same kind and flags are costed together
        groups: dict[tuple[str, bool, bool], int] = defaultdict(int)
        text_g, vis_g = grad_in or trainable, visual_grad and v > 0
        for kv_only in kv_only_layers:
            if kv_only:
                vis_in = (visual_grad and v > 0) if visual_per_layer else vis_g
                groups[("kv_only", text_g, vis_in)] += 1
                text_g, vis_g = text_g or trainable or vis_in, vis_in
            else:
                g = text_g or vis_g
                groups[("full", g, g)] += 1
                text_g = vis_g = g or trainable
        for phase in self.phases:
            if phase == "decode":
                self.decode_layers(L, visual_in_cache=True)
                continue
            for (kind, tg, vg), count in groups.items():
                start = len(self.cost.terms)
                if kind == "kv_only":
                    kv_rows = {"text": b * t} | ({"visual": b * v} if v else {})
                    self.decoder_layer_linears(phase, {"text": b * t}, kv_rows, trainable, tg,
                                               {"text": tg, "visual": vg}, count=count)
                    self.scores(phase, "attn_scores", "text", b * t * (t + v), b * eff_text, width, width, tg,
                                tg or vg, count)
                    out_grad, last = tg or vg, {("ffn", "text"): self.down_proj(b * t, count)}
                else:
                    self.decoder_layer_linears(phase, {r: b * k for r, k in rows.items()},
                                               {r: b * k for r, k in rows.items()}, trainable, tg, count=count)
                    for role, k in rows.items():
                        self.scores(phase, "attn_scores", role, b * k * n, b * eff_full.get(role, 0), width, width,
                                    tg, tg, count)
                    out_grad = tg or trainable
                    last = {("ffn", r): self.down_proj(b * k, count) for r, k in rows.items()}
                if phase == "train_step" and self.workload.gradient_checkpointing and out_grad:
                    self.recompute(start, last)
        self.kv_cache(L, visual_in_cache=True)
        return text_g

    def kv_cache(self, num_layers: int, visual_in_cache: bool) -> None:
        """Self-attention KV bytes per sample of ``num_layers`` layers: text (prompt + generated), visual if cached."""
        per_token = num_layers * 2 * self.llm.kv_dim * self.bytes_per_element
        text = (self.text + self.workload.generate_tokens) * per_token
        self.cost.kv_cache_bytes["text"] = self.cost.kv_cache_bytes.get("text", 0.0) + text
        if visual_in_cache:
            self.cost.kv_cache_bytes["visual"] = self.cost.kv_cache_bytes.get("visual", 0.0) + self.visual * per_token

    def lm_head(self, trainable: bool = False, grad_in: bool = False, train_rows: int | None = None) -> None:
        """Logits: every text token when training, the last token in prefill and decode."""
        c, b = self.llm, self.batch
        for phase in self.phases:
            rows = b * (self.text if train_rows is None else train_rows) if phase == "train_step" else b
            self.linear(phase, "lm_head", "text", rows, c.hidden_size, c.vocab_size, trainable, grad_in)
            if phase == "train_step" and grad_in:
                self._activations += rows * c.vocab_size * 2  # logits and their float copy for the loss


def stage_trains(model: Any, prefix: str, stage: str) -> bool:
    """Whether ``stage`` trains any parameter of ``model`` whose name starts with ``prefix``."""
    return any(name.startswith(prefix) for name in model.trainable_parameters(stage))


def spliced_reference_cost(llm: LLMConfig, vision: VisionConfig, workload: Workload,
                           tokens_per_image: int) -> CostBreakdown:
    """The LLaVA-1.5 wiring at inference — the tower on every image, a two-layer MLP connector, every visual
    token a full decoder token under the causal mask, the lm_head — with ``tokens_per_image`` visual tokens per
    image: the reference that equivalent visual tokens are counted in."""
    cm = CostModel(llm, workload.replace(stage="inference"), tokens_per_image)
    cm.vision_tower(vision)
    cm.mlp_connector(vision.hidden_size, llm.hidden_size, trainable=False)
    cm.spliced_decoder()
    cm.lm_head()
    return cm.result()


def equivalent_tokens(target: float, cost_at: dict[int, float]) -> float | None:
    """Visual tokens x at which a cost quadratic in x (given at three token counts) equals ``target``;
    None when ``target`` is below its value at the smallest count (no equivalent exists)."""
    (x0, f0), (x1, f1), (x2, f2) = sorted(cost_at.items())
    if target < f0:
        return None
    # f(x) = a + b·x + c·x² through the three points (Newton's divided differences)
    d1 = (f1 - f0) / (x1 - x0)
    c = ((f2 - f1) / (x2 - x1) - d1) / (x2 - x0)
    b = d1 - c * (x0 + x1)
    a = f0 - b * x0 - c * x0 * x0
    # the root of c·x² + b·x + (a − target) = 0 with x ≥ x0, in the form that stays exact as c → 0
    return 2 * (target - a) / (b + (b * b + 4 * c * (target - a)) ** 0.5)
