"""What an architecture declares about itself besides its modules: one :class:`ArchSpec` per architecture.

Every architecture class sets ``spec = ArchSpec(...)``; core, reports, benchmarks and tests read names,
colours, fast attention backends, tiny test options, checkpoint renames and FSDP units from it, so
adding an architecture touches no shared file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .choices import EQUAL_BUDGETS
from .config import ConfigError

ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "math", "flash", "flex")


COMPUTE_BUDGETS = frozenset({"flops", "visual_tokens"})  # what a knob of visual tokens moves (not the parameters)
ALL_BUDGETS = frozenset(EQUAL_BUDGETS)


def counts_up_to(bound: int) -> Callable[[Any, Any], list[int]]:
    """A knob's ``values`` for an option that counts something (queries, latents): 1, 2, ..., ``bound``."""
    return lambda model, workload: list(range(1, bound + 1))


@dataclass(frozen=True)
class BudgetKnob:
    """The option an equal-budget comparison (``compare --equal``) tunes for an architecture.

    ``values(model, workload)``: the settings to search, cheapest first (``model`` is built with the
    architecture's other options). ``moves``: the budgets (:data:`~mllm_bench.choices.EQUAL_BUDGETS`) the knob
    changes. ``monotone``: those among them whose value never decreases along ``values`` (searched by
    bisection); the others are searched over every value. ``tokens(model, workload)``: its count of visual
    tokens in the LLM (None: those spliced into the sequence), ``tokens_text`` what that count is (the
    model's options fill ``{fields}``). ``allowed``: the values, for people."""

    option: str
    allowed: str
    values: Callable[[Any, Any], list[Any]]
    moves: frozenset[str]
    monotone: frozenset[str]
    tokens: Callable[[Any, Any], int] | None = None
    tokens_text: str = "visual tokens in the sequence"

    def __post_init__(self) -> None:
        unknown = sorted((self.moves | self.monotone) - set(EQUAL_BUDGETS))
        if unknown or not self.monotone <= self.moves:
            raise ConfigError(f"BudgetKnob {self.option!r}: moves and monotone must be budgets of "
                              f"{list(EQUAL_BUDGETS)}, monotone among moves; got moves={sorted(self.moves)}, "
                              f"monotone={sorted(self.monotone)}")


@dataclass(frozen=True)
class ArchSpec:
    """An architecture's metadata.

    ``tiny_options``: options under which the architecture fits the ``tiny-*`` presets (what the shared
    tests and ``gpu_bench.py --tiny`` build). ``checkpoint_renames``: ``(old prefix, new prefix)`` pairs for
    transformers' names of this architecture's own modules (the decoder's and vision tower's are shared).
    ``fsdp_modules``: attribute names of the connector blocks sharded (and compiled) one by one; a
    ``ModuleList``/``ModuleDict`` contributes each child. ``components``: cost component of modules, by
    name, for modules whose class cannot declare ``cost_component`` itself (e.g. a bare ``nn.Linear``).
    ``order``: where the architecture sits in lists and tables (lower first, then by name).
    ``budget_knob``: the option ``compare --equal`` tunes (None: it runs as it is).
    """

    name: str
    display_name: str
    description: str
    color: str
    fast_attention_backend: str = "flash"
    tiny_options: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    fsdp_modules: tuple[str, ...] = ()
    components: Mapping[str, str] = field(default_factory=dict)
    order: int = 100
    budget_knob: BudgetKnob | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"ArchSpec.name must be a non-empty identifier (letters, digits, - or _), "
                              f"got {self.name!r}")
        if self.fast_attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"ArchSpec {self.name!r}: fast_attention_backend must be one of "
                              f"{list(ATTENTION_BACKENDS)}, got {self.fast_attention_backend!r}")
        if not (self.color.startswith("#") and len(self.color) == 7):
            raise ConfigError(f"ArchSpec {self.name!r}: color must be a hex colour like '#1f77b4', got {self.color!r}")
        object.__setattr__(self, "tiny_options", MappingProxyType(dict(self.tiny_options)))
        object.__setattr__(self, "components", MappingProxyType(dict(self.components)))
